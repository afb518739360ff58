"""One rank of tests/test_tensor_parallel.py (launched by torchrun): loads the saved model with
transformers' tensor parallelism, generates greedily with DynamicCache and with kvloom.Cache
under each policy, and writes what it saw to <out>/rank<R>.json."""
import json
import os
import sys

import torch

import kvloom
from transformers import AutoModelForCausalLM, DynamicCache

POLICIES = {"full": lambda: kvloom.Full(), "window": lambda: kvloom.Window(2, 8),
            "h2o": lambda: kvloom.HeavyHitter(0.2, 4)}


def main(model_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto")
    ids = torch.arange(3, 40)[None]
    res = {"tp": kvloom.hf.arch.tensor_parallel_size(model)}
    with torch.no_grad():
        res["dynamic"] = model.generate(ids, max_new_tokens=12, do_sample=False,
                                        **kvloom.hf.cache_kwargs(DynamicCache()))[0].tolist()
        kvloom.enable(model)
        for name, make in POLICIES.items():
            cache = kvloom.Cache(model, policy=make())
            toks = model.generate(ids, max_new_tokens=12, do_sample=False, **kvloom.hf.cache_kwargs(cache))
            res[name] = {"tokens": toks[0].tolist(), "bytes": cache.memory_bytes(), "kv_heads": cache.kv.n_kv_heads}
    for what, kw in (("taskkv", {"policy": kvloom.TaskKV()}), ("budget", {"kv_budget": 0.5})):
        try:
            kvloom.Cache(model, **kw)
            res[f"refused_{what}"] = ""
        except NotImplementedError as e:
            res[f"refused_{what}"] = str(e)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
