"""The kvloom command line: generate on the default model, bench e2e on a tiny saved model."""
import json
import os
import subprocess
import sys

import pytest

from kvloom import cli

pytestmark = pytest.mark.hf  # drives transformers: also run against the oldest supported release


def test_generate_default_model_streams_and_reports(capsys):
    assert cli.main(["generate", "Say hello.", "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert out.strip(), "the generated text is streamed to stdout"
    assert "tokens/s" in err and "MiB held" in err and "policy full" in err


def test_generate_window_policy(capsys):
    assert cli.main(["generate", "Count to five.", "--max-new-tokens", "4", "--policy", "window",
                     "--sinks", "2", "--recent", "8"]) == 0
    assert "window(sinks=2, recent=8)" in capsys.readouterr().err


def test_generate_fastgen_policy(capsys):
    assert cli.main(["generate", "Name a colour.", "--max-new-tokens", "4", "--policy", "fastgen",
                     "--recovery", "0.9"]) == 0
    assert "policy fastgen(recovery=0.9" in capsys.readouterr().err


def test_generate_quantized_storage(capsys):
    prompt = "Tell me about the sea. " * 40  # long enough that most blocks get quantized
    assert cli.main(["generate", prompt, "--raw", "--max-new-tokens", "4"]) == 0
    full = capsys.readouterr().err
    assert cli.main(["generate", prompt, "--raw", "--max-new-tokens", "4", "--kv-dtype", "int4"]) == 0
    q = capsys.readouterr().err
    mib = [float(e.split("KV ")[1].split(" MiB")[0]) for e in (full, q)]
    assert "int4 storage" in q and mib[1] < 0.5 * mib[0]
    with pytest.raises(SystemExit):
        cli.main(["generate", "x", "--kv-dtype", "int3"])
    # a memory budget: a tenth of Full's bytes (here the floor of one block per head and layer)
    assert cli.main(["generate", prompt, "--raw", "--max-new-tokens", "4", "--kv-budget", "0.1"]) == 0
    b = capsys.readouterr().err
    assert "budget 0.1 of Full" in b and float(b.split("KV ")[1].split(" MiB")[0]) < 0.15 * mib[0]


def test_bench_e2e_on_default_model_small(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["bench", "e2e", "--lengths", "96", "--new-tokens", "2", "--repeats", "1",
                     "--policies", "full,window", "--kv-dtype", "int4", "--out", str(out)]) == 0
    data = json.loads((out / "e2e.json").read_text())
    names = {r["cache"] for r in data["rows"]}
    assert names == {"dynamic+sdpa", "kvloom full", "kvloom window 50%", "kvloom full int4", "kvloom window 50% int4"}
    q = next(r for r in data["rows"] if r["cache"] == "kvloom full int4")
    assert q["kv_bytes"] < next(r for r in data["rows"] if r["cache"] == "kvloom full")["kv_bytes"]
    full = next(r for r in data["rows"] if r["cache"] == "kvloom full")
    win = next(r for r in data["rows"] if r["cache"] == "kvloom window 50%")
    assert win["kv_bytes"] < full["kv_bytes"]
    assert "| prompt tokens |" in capsys.readouterr().out


# the fidelity protocol's smallest grid (one short needle case, a few perplexity and agreement tokens)
SMALL_FIDELITY = ["--lengths", "160", "--depths", "0.5", "--seeds", "1", "--ppl-prefix", "64", "--ppl-tokens", "8",
                  "--agree-tokens", "4"]


def test_bench_quant_small(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["bench", "quant", *SMALL_FIDELITY, "--formats", "int8", "--policies", "full,window",
                     "--backends", "quanto", "--out", str(out)]) == 0
    data = json.loads((out / "quant.json").read_text())
    rows = {r["policy"]: r for r in data["rows"]}
    assert {"full", "window", "int8", "int8 + window"} <= set(rows)
    assert rows["int8"]["kv_bytes_vs_full"] < 0.5 and rows["int8 + window"]["kv_bytes_vs_full"] < rows["window"]["kv_bytes_vs_full"]
    # transformers' QuantizedCache runs beside it where quanto imports, else the table says why not
    assert "QuantizedCache int4 (quanto)" in rows or any("quanto" in m for m in data["not_run"])
    assert cli.main(["bench", "quant", "--formats", "int3", "--out", str(out)]) == 2
    assert "unknown --formats ['int3']" in capsys.readouterr().err


def test_bench_budget_small(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["bench", "budget", *SMALL_FIDELITY, "--policies", "window", "--formats", "fp,int8",
                     "--budget", "0.5", "--out", str(out)]) == 0
    data = json.loads((out / "budget.json").read_text())
    rows = {r["policy"]: r for r in data["rows"]}
    assert set(rows) == {"full", "window @0.5", "window @0.5 int8"} and data["budget"] == 0.5
    assert rows["window @0.5"]["kv_bytes_vs_full"] <= 0.5 and "needle_accuracy_after" in rows["full"]
    assert cli.main(["bench", "budget", "--budget", "2", "--out", str(out)]) == 2
    assert "kv_budget must be in (0, 1]" in capsys.readouterr().err


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "CPU kernels" in out and "huge pages:" in out


def test_info_says_when_huge_pages_are_off():
    """KVLOOM_HUGEPAGES=0 (read once per process) keeps the host arenas on ordinary pages."""
    env = dict(os.environ, KVLOOM_HUGEPAGES="0")
    r = subprocess.run([sys.executable, "-m", "kvloom", "info"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "huge pages:    off (KVLOOM_HUGEPAGES=0)" in r.stdout


@pytest.mark.slow
def test_bench_sidepath_small(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["bench", "sidepath", "--lengths", "300", "--subtasks", "1,2", "--new-tokens", "2",
                     "--out", str(out)]) == 0
    data = json.loads((out / "sidepath.json").read_text())
    rows = {(r["subtasks"], r["method"]): r for r in data["rows"]}
    assert {m for _, m in rows} == {"kvloom side path", "re-prefill", "deepcopy", "crop"}
    side, again, dcopy = rows[(2, "kvloom side path")], rows[(2, "re-prefill")], rows[(2, "deepcopy")]
    # the side path prefills the instruction only; re-prefill runs the whole conversation again
    assert side["prefill_tokens_per_subtask"] < 60 < side["conversation_tokens"] < again["prefill_tokens_per_subtask"]
    # extra memory: side-path tokens only (a few blocks per head), not a copy of the conversation
    assert side["peak_extra_kv_bytes"] < side["conversation_kv_bytes"] / 2 < dcopy["peak_extra_kv_bytes"]
    assert "| conversation tokens |" in capsys.readouterr().out


def test_hogwild_cli_streams_steps_and_transcript(capsys):
    assert cli.main(["hogwild", "Name two colours.", "--workers", "2", "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert "--- transcript ---" in out and "2 workers" in err and "batched forwards" in err


def test_bench_hogwild_small(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["bench", "hogwild", "--lengths", "0", "--workers", "1,2", "--new-tokens", "3", "--repeats", "1",
                     "--out", str(out)]) == 0
    data = json.loads((out / "hogwild.json").read_text())
    assert [r["workers"] for r in data["rows"]] == [1, 2]
    assert data["rows"][0]["hogwild_vs_one_worker"] == 1.0
    assert all(r["hogwild_tok_s"] > 0 and r["independent_tok_s"] > 0 for r in data["rows"])
    assert "| context |" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_distributed_small(tmp_path, capsys):
    """Real processes: TP on 1 and 3 ranks (2 does not divide SmolLM2's heads) and a transfer."""
    out = tmp_path / "out"
    assert cli.main(["bench", "distributed", "--procs", "1,2,3", "--context", "48", "--new-tokens", "2", "--repeats", "1",
                     "--tp-settings", "full,budget", "--transfer-settings", "full,window_int4", "--out", str(out)]) == 0
    data = json.loads((out / "distributed.json").read_text())
    assert [(r["procs"], r["setting"]) for r in data["rows"]] == [(1, "full"), (1, "budget"), (3, "full"), (3, "budget")]
    assert data["skipped_procs"] == [2]
    for r in data["rows"]:
        assert len(r["rank_bytes"]) == r["procs"] and r["same_tokens"]
    full = {r["procs"]: r for r in data["rows"] if r["setting"] == "full"}
    assert full[3]["total_bytes"] == full[1]["total_bytes"] == 3 * full[3]["rank_bytes"][0]
    sent = {r["setting"]: r for r in data["transfer"]}
    assert all(r["same_tokens"] and r["same_held"] for r in sent.values())
    assert sent["window_int4"]["wire_bytes"] < sent["full"]["wire_bytes"]
    assert "Prefill → decode transfer" in capsys.readouterr().out
    assert cli.main(["bench", "distributed", "--tp-settings", "nope", "--out", str(out)]) == 2
    assert "--tp-settings: unknown nope" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_sharing_small(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["bench", "sharing", "--steps", "1", "--seq-len", "64", "--batch-size", "1", "--eval-tokens", "128",
                     "--variants", "original,mqa mean,cla3", "--out", str(out)]) == 0
    data = json.loads((out / "sharing.json").read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert rows["mqa mean"]["kv_vs_original"] == pytest.approx(1 / 3)
    assert rows["cla3"]["kv_vs_original"] == pytest.approx(1 / 3)
    # the analytic bytes/token agree with what kvloom.Cache holds (block rounding aside)
    for r in rows.values():
        assert r["kv_bytes_per_token"] <= r["measured_kv_bytes_per_token"] <= 1.02 * r["kv_bytes_per_token"]
    assert "| variant |" in capsys.readouterr().out


def test_generate_with_shipped_nats_scorer(capsys):
    assert cli.main(["generate", "Say hello.", "--max-new-tokens", "6", "--policy", "nats"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "policy nats(window=" in err


@pytest.mark.slow
def test_bench_nats_small(tmp_path, capsys):
    from kvloom import nats

    sc = nats.Scorer(30, 576, 3, window=8)  # untrained: mostly global
    sc.save(tmp_path / "s.pt", lam=0.0)
    out = tmp_path / "out"
    assert cli.main(["bench", "nats", "--scorers", str(tmp_path / "s.pt"), "--lengths", "200", "--depths", "0.5",
                     "--seeds", "1", "--ppl-prefix", "64", "--ppl-tokens", "8", "--out", str(out)]) == 0
    data = json.loads((out / "nats.json").read_text())
    names = [r["policy"] for r in data["rows"]]
    assert names[0] == "full" and names[1].startswith("nats") and names[2].startswith("window at the bytes")
    assert data["rows"][0]["kv_fraction"] == 1.0
    assert abs(data["rows"][2]["kv_fraction"] - data["rows"][1]["kv_fraction"]) < 0.25
    assert "| policy |" in capsys.readouterr().out


# --- the newcomer's command line (issue 19) -------------------------------------------------
def _err_lines(capsys):
    err = capsys.readouterr().err
    return [line for line in err.strip().splitlines() if line.strip()]


def test_policy_defaults_come_from_the_registry_and_no_eviction_is_explained(capsys):
    assert cli.main(["generate", "Count to three.", "--max-new-tokens", "3", "--policy", "window"]) == 0
    err = capsys.readouterr().err
    assert "window(sinks=4, recent=1024) evicted nothing" in err and "--recent" in err
    assert cli.main(["generate", "Count to three.", "--max-new-tokens", "3", "--policy", "window", "--recent", "8"]) == 0
    assert "evicted nothing" not in capsys.readouterr().err
    # h2o keeps the registry's (= the Python API's) recent=64, not another CLI default
    assert cli.main(["generate", "Count to three.", "--max-new-tokens", "3", "--policy", "h2o"]) == 0
    assert "h2o(ratio=0.1, recent=64)" in capsys.readouterr().err


def test_generate_reports_prefill_and_decode_apart(capsys):
    assert cli.main(["generate", "Say hello.", "--max-new-tokens", "5"]) == 0
    err = capsys.readouterr().err
    assert "prefill:" in err and "prompt tokens in" in err and "decode: " in err and "tokens/s after the first" in err


@pytest.mark.parametrize("argv,message", [
    (["generate", "hi", "--model", "/nonexistent/model"], "/nonexistent/model: no such folder"),
    (["generate", "hi", "--model", "./missing-folder"], "no such folder"),
    (["generate", "   "], "the prompt is empty"),
    (["generate", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["generate", "hi", "--policy", "window", "--recent", "-3"], "recent must be in"),
    (["generate", "hi", "--policy", "window", "--recent", "many"], "invalid int value"),
    (["generate", "hi", "--policy", "full", "--ratio", "0.5"], "not a parameter of --policy full"),
    (["generate", "hi", "--kv-budget", "1.5"], "--kv-budget: kv_budget must be in (0, 1]"),
    (["hogwild", ""], "the problem is empty"),
])
def test_expected_failures_are_one_line_with_exit_code_2(capsys, argv, message):
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("kvloom") and "error" in line]) == 1


def test_unknown_hub_id_offline_fails_fast(capsys, monkeypatch):
    import time

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: unreachable at once
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    t0 = time.perf_counter()
    assert cli.main(["generate", "hi", "--model", "some-org/not-a-cached-model"]) == 2
    assert time.perf_counter() - t0 < 15
    err = capsys.readouterr().err
    assert "not in the Hugging Face cache" in err and "cannot be reached" in err and "Traceback" not in err


def test_debug_shows_the_traceback():
    from kvloom.models import ModelNotFoundError

    with pytest.raises(ModelNotFoundError):
        cli.main(["generate", "hi", "--model", "/nonexistent/model", "--debug"])


def test_hogwild_streams_text_while_it_is_written():
    from hf_helpers import smollm2
    from kvloom import hogwild

    model, tok = smollm2()
    calls, steps = [], []
    hogwild.generate(model, tok, "Name two colours.", workers=2, max_new_tokens=12,
                     on_text=lambda name, text: calls.append((name, text)),
                     on_step=lambda name, text: steps.append(name))
    assert {n for n, _ in calls} == {"Alice", "Bob"}
    # many small pieces, not one call per finished step
    assert len(calls) > 2 * max(1, len(steps))
    lines = cli._LineStreams(width=20)
    for name, text in calls:
        lines.write(name, text)
    lines.flush()


def test_benchmarks_write_a_fresh_folder_and_flag_impossible_figures(tmp_path, monkeypatch):
    from kvloom.bench import attention, harness

    assert harness.DEFAULT_OUT == "kvloom-bench" and "results" not in harness.DEFAULT_OUT
    raw = {"benchmarks": [
        {"extra_info": {"impl": "probe", "bytes": 1e9}, "stats": {"median": 0.1}},  # 10 GB/s measured
        {"extra_info": {"impl": "kvloom", "case": "c", "B": 1, "Hq": 8, "Hkv": 2, "T": 4096, "D": 64,
                        "dtype": "float32", "kv_bytes": 4e6}, "stats": {"median": 2e-4}},  # 20 GB/s: impossible
        {"extra_info": {"impl": "sdpa", "case": "c", "B": 1, "Hq": 8, "Hkv": 2, "T": 4096, "D": 64,
                        "dtype": "float32", "kv_bytes": 4e6}, "stats": {"median": 1e-3}}]}
    summary = attention.summarize(raw)
    assert summary["rows"][0]["noisy"]
    md = attention.BENCH.markdown(summary)
    assert "⚠ noisy" in md and "| c ⚠ |" in md
