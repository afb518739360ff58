"""One process of tests/test_distributed.py: rank 0 prefills and sends, rank 1 receives and
decodes, rank 2 stays silent (KV transfer over torch.distributed, gloo). Rank 1 also computes, locally, what the
sequence would have done had it never moved, and writes what it saw to <out>/rank1.json."""
import json
import os
import sys
import time

import torch
import torch.distributed as dist

import kvloom
from kvloom import distributed as kd
from kvloom.hf import cache_kwargs
from transformers import AutoModelForCausalLM

from policy_suite import _Tok

# name -> (policy, kv_dtype, kv_budget): the four policies the issue names, plus a quantized
# store and a budgeted one
SETTINGS = {"full": (lambda: kvloom.Full(), None, None), "window": (lambda: kvloom.Window(2, 8), None, None),
            "fastgen": (lambda: kvloom.FastGen(recovery=0.9), None, None),
            "taskkv": (lambda: kvloom.TaskKV.example(), None, None),
            "window_int4": (lambda: kvloom.Window(2, 12), "int4", None),
            "h2o_budget": (lambda: kvloom.HeavyHitter(0.2, 4), None, 0.5)}
PROMPT = torch.arange(3, 43)[None] % 100
STEPS = 10


def make_cache(model, name):
    pol, kv_dtype, budget = SETTINGS[name]
    return kvloom.Cache(model, pol(), tokenizer=_Tok(), block_size=4, kv_dtype=kv_dtype, kv_budget=budget)


def step(model, cache, ids):
    with torch.no_grad():
        logits = model(ids, **cache_kwargs(cache)).logits[:, -1]
    return logits, int(logits.argmax(-1))


def decode(model, cache, token, n):
    toks, logits = [], None
    for _ in range(n):
        logits, token = step(model, cache, torch.tensor([[token]]))
        toks.append(token)
    return toks, logits


def generate(model, ids, cache):
    with torch.no_grad():
        return model.generate(ids, **cache_kwargs(cache), max_new_tokens=8, do_sample=False, pad_token_id=0)[0].tolist()


def kv_cache():
    """A low-level cache with a sequence and a fork that share blocks (same on every rank)."""
    g = torch.Generator().manual_seed(1)
    kv = kvloom.KVCache(2, 2, 8, block_size=4, policy=kvloom.HeavyHitter(0.3, 3))
    a = kv.add_sequence()
    for layer in range(2):
        kv.append(layer, a, torch.randn(2, 11, 8, generator=g), torch.randn(2, 11, 8, generator=g))
        kv.accumulate_attention(layer, torch.randn(1, 2, 11, 8, generator=g), [a])
        kv.apply_policy(layer, a)
    b = kv.fork(a)
    kv.append(0, b, torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g))
    return kv, [a, b]


def observe(kv, seqs):
    out = []
    for s in seqs:
        for layer in range(kv.n_layers):
            for h in range(kv.n_kv_heads):
                k, v, ords, pos = kv.gather(layer, h, s)
                out.append([k.tolist(), v.tolist(), ords.tolist(), pos.tolist(), kv.scores(layer, h, s).tolist()])
    return out


def header_only(magic=kd.WIRE_MAGIC, version=kd.WIRE_VERSION, kind=2, n=100):
    dist.send(torch.tensor([magic, version, kind, n], dtype=torch.int64), 1)


def sender(model):
    for name in SETTINGS:
        cache = make_cache(model, name)
        _, first = step(model, cache, PROMPT)  # the prefill
        kd.send_cache(cache, 1, extra={"next": first, "bytes": cache.memory_bytes()})
    cache = make_cache(model, "window_int4")  # the README's example
    with torch.no_grad():
        model(PROMPT[:, :-1], **cache_kwargs(cache))
    kd.send_cache(cache, 1, extra={"ids": PROMPT.tolist()})
    kv, seqs = kv_cache()
    kd.send_sequences(kv, seqs, 1, extra={"blocks": kv.blocks_held()})
    blob = kvloom.snapshot.dumps("kvcache", *kv._snapshot_parts(seqs))
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0x40
    kd._send_blob(dist, bad, "kvcache", 1, None, 0)  # corrupted on the way
    kd._send_blob(dist, bytearray(blob[:-100]), "kvcache", 1, None, 0)  # cut short
    header_only(magic=12345)  # not a kvloom transfer
    header_only(version=kd.WIRE_VERSION + 1)  # a newer kvloom
    header_only(kind=1)  # a whole kvloom.Cache where sequences are expected
    header_only(n=-5)  # a nonsense size
    kd.send_sequences(kv, seqs[:1], 1)  # the receiver still works
    header_only(n=len(blob))
    os._exit(0)  # dies before the payload


def outcome(fn):
    try:
        fn()
        return "ok"
    except (kd.TransferError, kvloom.SnapshotError) as e:
        return f"{type(e).__name__}: {e}"


def receiver(model, out):
    res = {}
    for name in SETTINGS:
        got, extra = kd.recv_cache(model, 0, tokenizer=_Tok())
        held, wire = got.memory_bytes(), len(got.dumps())  # (what arrived, less the extra)
        toks, logits = decode(model, got, extra["next"], STEPS)
        here = make_cache(model, name)  # the same sequence, never moved
        _, first = step(model, here, PROMPT)
        here_toks, here_logits = decode(model, here, first, STEPS)
        full = make_cache(model, "full")
        step(model, full, PROMPT)
        res[name] = {"tokens": toks, "here": here_toks, "same_logits": bool(torch.equal(logits, here_logits)),
                     "first": [extra["next"], first], "bytes": [extra["bytes"], held], "wire": wire,
                     "full_bytes": full.memory_bytes()}
    got, extra = kd.recv_cache(model, 0, timeout=60)
    here = make_cache(model, "window_int4")
    with torch.no_grad():
        model(PROMPT[:, :-1], **cache_kwargs(here))
    res["readme"] = [generate(model, torch.tensor(extra["ids"]), c) for c in (got, here)]
    kv, seqs = kv_cache()  # this rank's own sequences, which the transfers must leave alone
    mine = observe(kv, seqs)
    sent, _ = kv_cache()  # what the sender holds, to compare with what arrives
    ids, extra = kd.recv_sequences(kv, 0)
    res["kvcache"] = {"ids": ids, "same": observe(kv, ids) == observe(sent, seqs), "mine": observe(kv, seqs) == mine,
                      "blocks": [extra["blocks"], kv.blocks_held() - sent.blocks_held()]}
    before = observe(kv, kv.sequences())
    res["errors"] = [outcome(lambda: kd.recv_sequences(kv, 0)) for _ in range(6)]
    res["after_errors"] = observe(kv, kv.sequences()) == before
    ids2, _ = kd.recv_sequences(kv, 0)
    res["good_after_errors"] = observe(kv, ids2) == observe(sent, seqs[:1])
    before = observe(kv, kv.sequences())
    res["died"] = outcome(lambda: kd.recv_sequences(kv, 0))
    res["timeout"] = outcome(lambda: kd.recv_sequences(kv, 2, timeout=0.5))
    res["intact"] = observe(kv, kv.sequences()) == before
    with open(os.path.join(out, "rank1.json"), "w") as f:
        json.dump(res, f)


def main(model_dir, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    kvloom.enable(model)
    if dist.get_rank() == 0:
        sender(model)
    elif dist.get_rank() == 2:  # a peer that stays silent past the receiver's timeout
        time.sleep(5)
        os._exit(0)
    else:
        receiver(model, out)
        os._exit(0)  # the sender is gone: no barrier to wait for


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
