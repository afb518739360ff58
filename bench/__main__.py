"""kvloom benchmarks.

    python -m bench attention [--quick] [--out bench/results] [--threads N]

    python -m bench stats [--out bench/results]
    python -m bench readme


The first runs the kernel micro-benchmarks under pytest-benchmark (calibrated rounds, its
raw JSON kept for --benchmark-compare) and writes attention.json, attention.md and
attention.png; the second times the prompt statistics (tiled C++ vs dense torch) and writes
stats.json and stats.md; `readme` copies every bench/results/NAME.md into the README
between its `<!-- results:NAME -->` markers, so the tables there are the measured ones.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def attention(args) -> int:
    import pytest

    from . import report

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "attention-raw.json"
    os.environ["KVLOOM_BENCH_QUICK"] = "1" if args.quick else "0"
    if args.threads:
        os.environ["KVLOOM_BENCH_THREADS"] = str(args.threads)
    if args.rounds:
        os.environ["KVLOOM_BENCH_ROUNDS"] = str(args.rounds)
    rc = pytest.main([str(HERE / "test_attention_bench.py"), "-q", "-p", "no:cacheprovider",
                      f"--rootdir={HERE.parent}", "--benchmark-only", f"--benchmark-json={raw}",
                      "--benchmark-columns=median,iqr,rounds", "--benchmark-sort=name"])
    if rc != 0:
        print(f"benchmark run failed (pytest exit {rc})", file=sys.stderr)
        return int(rc)
    import kvloom

    data = json.loads(raw.read_text())
    data["kvloom_threads"] = kvloom.get_num_threads()
    raw.write_text(json.dumps(data))
    summary = report.write(raw, out)
    print()
    print(report.markdown(summary))
    print(f"wrote {out / 'attention.json'}, {out / 'attention.md'}, {out / 'attention.png'} (raw: {raw})")
    return 0


def readme(path: Path = HERE.parent / "README.md", results: Path = HERE / "results") -> int:
    import re

    text = path.read_text()

    def fill(m):
        md = results / f"{m.group(1)}.md"
        body = md.read_text().strip() + "\n" if md.exists() else "(not measured yet)\n"
        return f"<!-- results:{m.group(1)} -->\n{body}<!-- /results:{m.group(1)} -->"

    new = re.sub(r"<!-- results:(\w+) -->.*?<!-- /results:\1 -->", fill, text, flags=re.S)
    path.write_text(new)
    print(f"{path}: {'updated' if new != text else 'unchanged'}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("attention", help="decode attention: kvloom vs torch SDPA vs the read-bandwidth floor")
    a.add_argument("--quick", action="store_true", help="only the cases the targets are about")
    a.add_argument("--out", default=str(HERE / "results"), help="output folder (default bench/results)")
    a.add_argument("--threads", type=int, default=0, help="threads for kvloom and torch (default: all cores)")
    a.add_argument("--rounds", type=int, default=0, help="timed rounds per case (default 30)")
    st = sub.add_parser("stats", help="prompt statistics (H2O / FastGen profiling): tiled C++ vs dense torch")
    st.add_argument("--out", default=str(HERE / "results"), help="output folder (default bench/results)")
    sub.add_parser("readme", help="copy bench/results/*.md into the README's results markers")
    args = p.parse_args(argv)
    if args.what == "readme":
        return readme()
    if args.what == "attention":
        return attention(args)
    if args.what == "stats":
        from . import stats

        return stats.main(Path(args.out))
    return 2


if __name__ == "__main__":
    sys.exit(main())
