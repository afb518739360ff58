"""One rank of tests/test_tensor_parallel.py (launched by torchrun): loads the saved model with
transformers' tensor parallelism, generates greedily with DynamicCache and with kvloom.Cache
under each policy, and writes what it saw to <out>/rank<R>.json."""
import json
import os
import sys

import torch

import kvloom
from transformers import AutoModelForCausalLM, DynamicCache

# name -> kvloom.Cache keywords, made from the test's folder (NAtS's scorer is saved there)
POLICIES = {"full": lambda d: {"policy": kvloom.Full()}, "window": lambda d: {"policy": kvloom.Window(2, 8)},
            "h2o": lambda d: {"policy": kvloom.HeavyHitter(0.2, 4)},
            "taskkv": lambda d: {"policy": kvloom.TaskKV(beta=0.5, m=1, sinks=2, recent=4, budget=0.3, top_t=8)},
            "nats": lambda d: {"policy": kvloom.NAtS(scorer=os.path.join(d, "scorer.pt"))},
            # the budget compares every head of a layer: the ranks merge their give-way units
            "full_budget": lambda d: {"kv_budget": 0.3, "block_size": 4},
            "h2o_budget_int8": lambda d: {"policy": kvloom.HeavyHitter(0.5, 8), "kv_budget": 0.4, "block_size": 4,
                                          "kv_dtype": "int8"}}


def _greedy(model, cache, token, n):
    out = []
    for _ in range(n):
        token = model(token, **kvloom.hf.cache_kwargs(cache)).logits[:, -1:].argmax(-1)
        out.append(int(token))
    return out, token


@torch.no_grad()
def side_path(model, ids):
    """A CIFLEX-style side path: fork after the prompt, decode on the fork, close it, decode on
    the main cache, roll back three tokens and decode again (H2O: the fork keeps its plans)."""
    cache = kvloom.Cache(model, policy=kvloom.HeavyHitter(0.2, 4))
    first = model(ids, **kvloom.hf.cache_kwargs(cache)).logits[:, -1:].argmax(-1)
    fork = cache.fork()
    side, _ = _greedy(model, fork, first, 6)
    fork.close()
    main, last = _greedy(model, cache, first, 6)
    cache.rollback(3)
    again, _ = _greedy(model, cache, torch.tensor([[main[2]]]), 4)
    return {"side": side, "main": main, "again": again, "bytes": cache.memory_bytes()}


def kv_budget_paths(rank: int, world: int, defer: bool = False):
    """A low-level KVCache of 4 kv heads (this rank's share of them) under an int8 H2O with a
    budget, fed chunks then single tokens: the live slots of each head after every step. With
    world 1 it is the single-process cache; else its budget is settled across the ranks, at
    once or deferred to flush_budget."""
    import torch.distributed as dist

    g = torch.Generator().manual_seed(5)
    H, mine = 4, 4 // world
    kv = kvloom.KVCache(2, mine, 8, block_size=4, policy=kvloom.HeavyHitter(0.4, 3), kv_budget=0.35, kv_dtype="int8")
    if world > 1:
        kv.share_heads(dist.group.WORLD, rank * mine, H, defer=defer)
    own = slice(rank * mine, (rank + 1) * mine)
    seqs = [kv.add_sequence()]
    trace = []
    for step, n in enumerate([13, 1, 1, 6, 1, 1, 1, 9, 1, 1]):
        if step == 4:
            seqs.append(kv.fork(seqs[0]))  # forks share blocks: rounds on the real state
        for s in seqs:
            for layer in range(2):
                k, v = torch.randn(H, n, 8, generator=g), torch.randn(H, n, 8, generator=g)
                q = torch.randn(1, 2 * H, n, 8, generator=g)
                kv.append(layer, s, k[own], v[own])
                kv.accumulate_attention(layer, q[:, 2 * own.start:2 * own.stop], [s])
                kv.apply_policy(layer, s)
        kv.flush_budget()
        trace.append([[kv.slots(layer, h, s)[1].tolist() for layer in range(2) for h in range(mine)] for s in seqs])
    return trace


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
            cache = kvloom.Cache(model, **make(out))
            toks = model.generate(ids, max_new_tokens=12, do_sample=False, **kvloom.hf.cache_kwargs(cache))
            res[name] = {"tokens": toks[0].tolist(), "bytes": cache.memory_bytes(), "kv_heads": cache.kv.n_kv_heads}
            res[name]["total"] = kvloom.distributed.total_memory_bytes(cache)
            res[name]["lengths"] = cache.kv.lengths(cache.seqs[0])  # [layer][local kv head]
        res["side_path"] = side_path(model, ids)
    res["kv_budget_paths"] = [kv_budget_paths(rank, 2, defer) for defer in (False, True)]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    _shut_down()


def _shut_down() -> None:
    """Both ranks leave together and close the process group: a rank that exits while gloo's
    threads still serve its peer can die in teardown ("terminate called without an active
    exception", seen twice in CI on 2026-12-05) after its work was done."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
