"""The README's set-up commands are the ones CI runs, and its quick start runs."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme():
    p = ROOT / "README.md"
    if not p.exists():
        pytest.skip("no source checkout")
    return p.read_text()


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in _readme(), f"README must show the test command CI runs: {ci}"


def test_quick_start_runs():
    text = _readme()
    block = re.search(r"## Quick start.*?```python\n(.*?)```", text, re.S)
    assert block, "README has a python quick start block"
    exec(compile(block.group(1), "README quick start", "exec"), {})
