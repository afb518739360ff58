"""The README's set-up commands are the ones CI runs, and its quick start runs."""
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.hf  # drives transformers: also run against the oldest supported release

ROOT = Path(__file__).resolve().parents[1]


def _readme():
    p = ROOT / "README.md"
    if not p.exists():
        pytest.skip("no source checkout")
    return p.read_text()


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in _readme(), f"README must show the test command CI runs: {ci}"


def test_ci_tests_the_declared_transformers_range():
    """pyproject's lower bound is the release .ci/run tests as the oldest; the range stops before 6."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    low, high = re.search(r'"transformers>=([\d.]+),<([\d.]+)"', pyproject).groups()
    oldest = re.search(r"^OLDEST_TRANSFORMERS=([\d.]+)", (ROOT / ".ci" / "run").read_text(), re.M).group(1)
    assert [int(x) for x in oldest.split(".")] == [int(x) for x in (low + ".0.0").split(".")[:3]], (low, oldest)
    assert high == "6"


def test_quick_start_runs():
    text = _readme()
    section = re.search(r"## Quick start(.*?)\n## ", text, re.S).group(1)
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) >= 2, "README quick start has the C++-cache and the transformers examples"
    from kvloom.hf import cache_kwarg

    for i, code in enumerate(blocks):
        if cache_kwarg() != "cache":  # the README shows the current keyword; older releases take the old one
            code = code.replace("cache=cache", f"{cache_kwarg()}=cache")
        exec(compile(code, f"README quick start block {i}", "exec"), {})


def test_readme_tables_are_the_measured_results():
    """Every `<!-- results:NAME -->` block holds bench/results/NAME.md (`kvloom bench readme`)."""
    blocks = re.findall(r"<!-- results:(\w+) -->\n(.*?)<!-- /results:\1 -->", _readme(), re.S)
    assert blocks
    for name, body in blocks:
        md = ROOT / "bench" / "results" / f"{name}.md"
        assert md.exists(), f"README shows results:{name} but bench/results/{name}.md is missing"
        assert body.strip() == md.read_text().strip(), f"README results:{name} differs from {md}; run kvloom bench readme"


def test_side_path_example_runs():
    text = _readme()
    section = re.search(r"## Side paths \(CIFLEX\)(.*?)\n## ", text, re.S).group(1)
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code.replace("max_new_tokens=64", "max_new_tokens=8").replace("max_new_tokens=32", "max_new_tokens=6"),
                 "README side-path example", "exec"), {})


def test_adding_a_policy_is_one_file_and_passes_the_shared_suite(capsys):
    """The README's toy policy registers itself, appears in the CLI and passes the suite."""
    import policy_suite

    from kvloom import cli, policies

    text = _readme()
    section = re.search(r"## Adding a policy(.*?)\n## ", text, re.S).group(1)
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ns = {}
    exec(compile(code, "README toy policy", "exec"), ns)
    try:
        cls = policies.get("every_kth")
        assert cls is ns["EveryKth"]
        for seed in range(8):
            policy_suite.check_kvcache(cls.example(), seed)
        policy_suite.check_hf(cls)
        with pytest.raises(SystemExit):
            cli.main(["generate", "x", "--help"])
        assert "--k " in capsys.readouterr().out
    finally:
        policies.unregister("every_kth")
