"""kvloom.Cache under transformers' tensor parallelism (issue 18): two real processes (torchrun,
gloo on the CPU, one thread each), each holding half of a tiny Llama's or Qwen2's heads; every
rank's cache holds its local kv heads only, greedy Full equals DynamicCache token for token, and every policy
(Task-KV's layer centre gathered across the ranks, NAtS's types sliced to the rank's heads)
keeps, head by head, what one process keeps and gives the single-process tokens."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvloom

HERE = Path(__file__).parent


@pytest.mark.hf
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cache_under_tensor_parallelism(arch, tmp_path):
    from hf_helpers import generate
    sys.path.insert(0, str(HERE))
    from tp_worker import POLICIES, kv_budget_paths, side_path

    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(0)  # 8 query heads, 4 kv heads: two kv heads per rank
    cfg = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch](
        vocab_size=256, hidden_size=128, intermediate_size=128, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=512)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    model.save_pretrained(tmp_path / "model")
    kvloom.nats.Scorer(3, 128, 4, window=6).save(tmp_path / "scorer.pt")  # random weights: mixed types
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / "tp_worker.py"), str(tmp_path / "model"), str(tmp_path)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    ids = torch.arange(3, 40)[None]
    kvloom.enable(model)
    single = {}
    for name, make in POLICIES.items():
        cache = kvloom.Cache(model, **make(str(tmp_path)))
        single[name] = (generate(model, {"input_ids": ids}, cache, max_new_tokens=12)[0].tolist(), cache.memory_bytes(),
                        cache.kv.lengths(cache.seqs[0]))
    single_side = side_path(model, ids)
    one = kv_budget_paths(0, 1)  # per step, per sequence: the live ords of each (layer, head)
    for defer in (0, 1):  # the ranks' halves, settled at once or deferred, are the single cache
        halves = [r["kv_budget_paths"][defer] for r in ranks]
        for step, want in enumerate(one):
            got = [a[:2] + b[:2] + a[2:] + b[2:] for a, b in zip(halves[0][step], halves[1][step])]
            assert got == want, (defer, step)
    for r in ranks:
        assert r["tp"] == 2
        side = {k: v for k, v in r["side_path"].items() if k != "bytes"}
        assert side == {k: v for k, v in single_side.items() if k != "bytes"}  # fork, close, rollback under TP
        assert r["full"]["tokens"] == r["dynamic"]  # Full == DynamicCache + sdpa under TP
        for name in POLICIES:
            assert r[name]["kv_heads"] == 2
            assert r[name]["tokens"] == single[name][0], name
            assert r[name]["total"] == single[name][1], name
    assert sum(r["side_path"]["bytes"] for r in ranks) == single_side["bytes"]
    for name in POLICIES:
        assert sum(r[name]["bytes"] for r in ranks) == single[name][1], name
        # head by head, every rank kept what one process keeps for those heads
        assert [ranks[0][name]["lengths"][i] + ranks[1][name]["lengths"][i] for i in range(3)] == single[name][2], name


@pytest.mark.hf
@pytest.mark.slow
def test_smollm2_on_three_ranks(tmp_path):
    """SmolLM2 on 3 ranks (one kv head each): greedy kvloom Full equals DynamicCache + sdpa and
    one process, and two Hogwild! workers over one shared cache write one process's texts."""
    from hf_helpers import smollm2
    sys.path.insert(0, str(HERE))
    from tp_smollm2_worker import run

    from kvloom.bench.distributed import launch

    launch([str(HERE / "tp_smollm2_worker.py"), str(tmp_path / "r.json")], 3, timeout=600)
    got = json.loads((tmp_path / "r.json").read_text())
    model, tok = smollm2()
    before = model.config._attn_implementation  # the shared model: leave it as it was
    kvloom.enable(model)
    try:
        here = run(model, tok)
    finally:
        model.set_attn_implementation(before)
    assert got.pop("tp") == 3
    assert got["full"] == got["dynamic"]
    assert got == here
