"""The one benchmark harness: every benchmark is a :class:`Benchmark` in its own module of
this package (``BENCH = MyBenchmark()``), run as ``kvloom bench <name>``.

A benchmark declares its options, runs its grid of cases under a progress bar
(:meth:`Benchmark.grid`) into rows, and returns a summary dict with those rows; the harness
writes ``<name>.json``, ``<name>.md`` (the markdown table, also printed) and ``<name>.png``
(matplotlib, when installed) into ``--out`` and says where they went.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence

DEFAULT_OUT = "kvloom-bench"


class Benchmark:
    """Base class: override ``add_options``, ``run``, ``markdown`` and (optionally) ``draw``."""

    name: str = ""
    help: str = ""

    def add_options(self, p: argparse.ArgumentParser) -> None:
        """The benchmark's own command-line options (``--out`` and ``--model`` are common)."""

    def run(self, args: argparse.Namespace) -> dict:
        """Runs the grid; returns a JSON-able summary holding ``rows``."""
        raise NotImplementedError

    def markdown(self, summary: dict) -> str:
        """The results table (what the README shows)."""
        raise NotImplementedError

    def draw(self, summary: dict, plt):
        """The figure of a summary: returns (matplotlib figure, title or None), or None for none."""
        return None

    def plot(self, summary: dict, path: Path) -> bool:
        """Draws ``summary`` into ``path`` (PNG); False without matplotlib or without a figure."""
        plt = pyplot()
        drawn = None if plt is None else self.draw(summary, plt)
        if drawn is None:
            return False
        fig, title = drawn
        return save(fig, path, title)

    # --- helpers for benchmarks ---------------------------------------------------------------
    def grid(self, cases: Sequence, fn: Callable, *, unit: str = "run", postfix: Optional[Callable] = None) -> List:
        """Runs ``fn(case)`` for every case under a progress bar; returns the results in
        order. ``postfix(case, result)`` gives the bar's status text."""
        from tqdm import tqdm

        out = []
        with tqdm(total=len(cases), desc=f"kvloom bench {self.name}", unit=unit) as bar:
            for case in cases:
                res = fn(case)
                out.append(res)
                if postfix is not None:
                    bar.set_postfix_str(postfix(case, res))
                bar.update(1)
        return out

    def write(self, summary: dict, out_dir: Path) -> List[Path]:
        """Writes the JSON, markdown and (if drawn) PNG of a summary; returns their paths."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = [out_dir / f"{self.name}.json", out_dir / f"{self.name}.md"]
        paths[0].write_text(json.dumps(summary, indent=2))
        paths[1].write_text(self.markdown(summary))
        png = out_dir / f"{self.name}.png"
        if self.plot(summary, png):
            paths.append(png)
        return paths


def table(headers: Sequence[str], rows: Iterable[Sequence], align: Optional[str] = None) -> str:
    """A markdown table; ``align`` is one character per column ('l' or 'r', default left)."""
    sep = ["---:" if a == "r" else "---" for a in (align or "l" * len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save(fig, path, title=None) -> bool:
    """Titles, lays out, writes (PNG, 120 dpi) and closes a figure; returns True."""
    import matplotlib.pyplot as plt

    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def ints(text: str) -> List[int]:
    """'512,2048' -> [512, 2048] (argparse type)."""
    return [int(x) for x in str(text).split(",") if x.strip()]


def floats(text: str) -> List[float]:
    return [float(x) for x in str(text).split(",") if x.strip()]


def words(text: str) -> List[str]:
    return [x.strip() for x in str(text).split(",") if x.strip()]


def main(bench: Benchmark, args: argparse.Namespace) -> int:
    """Runs one benchmark from parsed arguments: run, write, print the table and the paths."""
    summary = bench.run(args)
    paths = bench.write(summary, Path(args.out))
    print(bench.markdown(summary))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def add_common_options(p: argparse.ArgumentParser, model: bool = True) -> None:
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: ./{DEFAULT_OUT})")
    if model:
        p.add_argument("--model", default=None, help="HF model path or id (default: the embedded SmolLM2-135M-Instruct)")


def readme(readme_path: Path, results: Path) -> int:
    """Copies every ``results/NAME.md`` into the README between its ``<!-- results:NAME -->``
    markers, so the tables there are the measured ones."""
    import re

    readme_path, results = Path(readme_path), Path(results)
    text = readme_path.read_text()

    def fill(m):
        md = results / f"{m.group(1)}.md"
        body = md.read_text().strip() + "\n" if md.exists() else "(not measured yet)\n"
        return f"<!-- results:{m.group(1)} -->\n{body}<!-- /results:{m.group(1)} -->"

    new = re.sub(r"<!-- results:(\w+) -->.*?<!-- /results:\1 -->", fill, text, flags=re.S)
    readme_path.write_text(new)
    print(f"{readme_path}: {'updated' if new != text else 'unchanged'}", file=sys.stderr)
    return 0
