"""kvloom.Cache under transformers' tensor parallelism (issue 18, first step): two real
processes (torchrun, gloo on the CPU, one thread each), each holding half of a tiny Llama's
heads; every rank's cache holds its local kv heads only, greedy Full equals DynamicCache token
for token, and each per-head policy gives the single-process tokens with the single-process
bytes split across the ranks."""
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
def test_cache_under_tensor_parallelism(tmp_path):
    from hf_helpers import generate, tiny_model
    sys.path.insert(0, str(HERE))
    from tp_worker import POLICIES

    model = tiny_model("llama")  # 4 query heads, 2 kv heads: one kv head per rank
    model.save_pretrained(tmp_path / "model")
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
        cache = kvloom.Cache(model, policy=make())
        single[name] = (generate(model, {"input_ids": ids}, cache, max_new_tokens=12)[0].tolist(), cache.memory_bytes())
    for r in ranks:
        assert r["tp"] == 2
        assert "TaskKV" in r["refused_taskkv"] and "kv_budget" in r["refused_budget"]  # not yet: a clear error
        assert r["full"]["tokens"] == r["dynamic"]  # Full == DynamicCache + sdpa under TP
        for name in POLICIES:
            assert r[name]["kv_heads"] == 1
            assert r[name]["tokens"] == single[name][0], name
    for name in POLICIES:
        assert sum(r[name]["bytes"] for r in ranks) == single[name][1], name
