"""One rank of tests/test_tensor_parallel.py::test_smollm2_on_three_ranks: SmolLM2 sharded over
3 processes (its 3 kv heads, one per rank); greedy DynamicCache + sdpa and kvloom Full, then two
Hogwild! workers over one shared cache; rank 0 writes the results to <out>."""
import json
import os
import sys

import torch

import kvloom
from kvloom import models
from kvloom.hf.compat import cache_kwargs, tensor_parallel_kwargs

PROBLEM = "List three fruits and three vegetables."


def run(model, tok):
    from transformers import DynamicCache

    ids = tok(PROBLEM, return_tensors="pt")["input_ids"]
    res = {}
    with torch.no_grad():
        for name, make in (("dynamic", DynamicCache), ("full", lambda: kvloom.Cache(model))):
            model.set_attn_implementation("sdpa" if name == "dynamic" else "kvloom")
            out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, **cache_kwargs(make()))
            res[name] = out[0].tolist()
    r = kvloom.hogwild.generate(model, tok, PROBLEM, workers=2, max_new_tokens=10)
    res["hogwild"] = {"workers": r.workers, "transcript": r.transcript, "tokens": r.tokens}
    return res


if __name__ == "__main__":
    torch.set_num_threads(1)
    model, tok = models.load(None, **tensor_parallel_kwargs())
    kvloom.enable(model)
    res = {"tp": kvloom.hf.arch.tensor_parallel_size(model), **run(model, tok)}
    if os.environ["RANK"] == "0":
        with open(sys.argv[1], "w") as f:
            json.dump(res, f)
    import torch.distributed as dist

    if dist.is_initialized():  # leave together and close the group (see tp_worker._shut_down)
        dist.barrier()
        dist.destroy_process_group()
