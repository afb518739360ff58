"""The fidelity benchmark's harness on a tiny configuration: needle cases are well formed,
the run writes JSON/markdown with one row per policy, and Full scores itself perfectly."""
import json

import pytest

from kvloom import cli
from kvloom.bench import fidelity
from hf_helpers import smollm2

pytestmark = pytest.mark.hf  # drives transformers: also run against the oldest supported release


def test_needle_cases_hide_the_answer():
    _, tok = smollm2()
    cases = fidelity.needle_cases(tok, [120], [0.0, 0.5, 1.0], 2)
    assert len(cases) == 6
    for c in cases:
        text = tok.decode(c["ids"][0])
        assert c["answer"] in text and len(c["answer"]) == 7
        assert text.count(c["answer"]) == 1


@pytest.mark.slow
def test_fidelity_run_small(tmp_path, capsys):
    out = tmp_path / "fid"
    assert cli.main(["bench", "fidelity", "--lengths", "120", "--depths", "0.5", "--seeds", "1", "--ppl-prefix", "32",
                     "--ppl-tokens", "8", "--agree-tokens", "8", "--only", "window,fastgen T=0.95",
                     "--out", str(out)]) == 0
    data = json.loads((out / "fidelity.json").read_text())
    rows = {r["policy"]: r for r in data["rows"]}
    assert set(rows) == {"full", "window", "fastgen T=0.95"}
    full = rows["full"]
    assert full["kv_bytes_vs_full"] == 1.0 and full["greedy_prefix_agreement"] == 1.0
    assert full["perplexity_delta_pct"] == 0.0
    assert rows["window"]["kv_bytes_vs_full"] < 0.7
    # per-case results: one hit and one answer per case, the hits agreeing with the accuracy
    assert len(data["cases"]) == data["needle_cases"] == 1 and data["cases"][0]["tokens"] == 120
    for r in rows.values():
        assert len(r["needle_hits"]) == len(r["needle_answers"]) == 1
        assert r["needle_accuracy"] == sum(r["needle_hits"]) / len(r["needle_hits"])
        assert r["needle_hits"][0] == int(data["cases"][0]["answer"] in r["needle_answers"][0])
    assert "| policy |" in capsys.readouterr().out
