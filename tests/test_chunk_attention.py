"""Chunk attention over the cache (C++, and the gathering path long chunks take on CUDA caches)
against a float64 reference: a chunk of query tokens over each head's live keys plus the chunk
itself, causal by token position whatever was evicted, with transformers' padding mask,
GQA/MQA, forks and every kernel path."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import kvloom
from conftest import TOL


def reference(cache, layer, q, seqs, mask, scale):
    """out [B, Hq, Tq, D] in float64 from the gathered live keys of each head."""
    B, Hq, Tq, D = q.shape
    G = Hq // cache.n_kv_heads
    out = torch.zeros(B, Hq, Tq, D, dtype=torch.float64)
    for b, s in enumerate(seqs):
        n = cache.seq_length(s)
        for h in range(cache.n_kv_heads):
            k, v, ords, _ = cache.gather(layer, h, s, dtype=torch.float32)
            k, v = k.double(), v.double()
            ords = ords.long()
            for t in range(Tq):
                vis = ords <= n - Tq + t
                if mask is not None:
                    m = mask[b, t, ords]
                    vis &= m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
                if not vis.any():
                    continue
                for g in range(G):
                    qq = q[b, h * G + g, t].double()
                    w = torch.softmax((k[vis] @ qq) * scale, 0)
                    out[b, h * G + g, t] = w @ v[vis]
    return out


@settings(max_examples=40, deadline=None)
@given(heads=st.sampled_from([(9, 3), (8, 1), (4, 4), (14, 2)]), D=st.sampled_from([64, 16, 40]),
       past=st.integers(0, 70) | st.integers(200, 700), Tq=st.integers(1, 40), B=st.integers(1, 3), block=st.sampled_from([4, 16]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       evict=st.floats(0, 0.6), fork=st.booleans(), masked=st.sampled_from([None, "bool", "float"]),
       path=st.sampled_from(["kernel", "kernel", "gather"]), kv=st.sampled_from([None, None, "int8", "int4"]),
       seed=st.integers(0, 10_000))
def test_chunk_attention_matches_reference(isa, heads, D, past, Tq, B, block, dtype, evict, fork, masked, path, kv,
                                           seed):
    """path "gather": the gathering path long chunks on CUDA caches take, run here on the CPU.
    past: up to 70 tokens, or enough for several softmax steps of the kernel (256 keys or 64
    blocks at most each); kv: a quantized cache, whose full blocks are sealed before the chunk."""
    Hq, Hkv = heads
    g = torch.Generator().manual_seed(seed)
    cache = kvloom.KVCache(1, Hkv, D, dtype=dtype, block_size=block, kv_dtype=kv)
    seqs = []
    for b in range(B):
        s = cache.add_sequence()
        if past:
            cache.append(0, s, torch.randn(Hkv, past, D, generator=g), torch.randn(Hkv, past, D, generator=g))
        if fork:
            s = cache.fork(s)  # the chunk lands in copied-on-write blocks
        seqs.append(s)
    for b, s in enumerate(seqs):  # random evictions of past tokens, per head
        for h in range(Hkv):
            slots = cache.slots(0, h, s)[0]
            drop = [int(x) for x in slots if torch.rand(1, generator=g).item() < evict]
            if drop:
                cache.evict(0, h, s, drop)
        cache.append(0, s, torch.randn(Hkv, Tq, D, generator=g), torch.randn(Hkv, Tq, D, generator=g))
    q = torch.randn(B, Hq, Tq, D, generator=g).to(dtype)
    mask = None
    if masked:
        K = past + Tq
        vis = torch.rand(B, Tq, K, generator=g) > 0.2  # padding-like holes, plus causality on top
        mask = vis if masked == "bool" else torch.zeros(B, Tq, K).masked_fill(~vis, torch.finfo(torch.float32).min)
    scale = D ** -0.5
    if path == "kernel":
        got = cache.chunk_attention(0, q, seqs, mask=mask, scale=scale)
    else:
        got = cache._chunk_by_gather(0, q, seqs, mask, scale)
    want = reference(cache, 0, q, seqs, mask, scale).to(dtype)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


def test_chunk_attention_bad_input():
    cache = kvloom.KVCache(1, 2, 8)
    s = cache.add_sequence()
    cache.append(0, s, torch.randn(2, 5, 8), torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="must be appended"):
        cache.chunk_attention(0, torch.randn(1, 4, 6, 8), [s])
    with pytest.raises(ValueError, match="mask must be"):
        cache.chunk_attention(0, torch.randn(1, 4, 3, 8), [s], mask=torch.ones(1, 2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask covers"):
        cache.chunk_attention(0, torch.randn(1, 4, 3, 8), [s], mask=torch.ones(1, 3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        cache.chunk_attention(0, torch.randn(1, 3, 3, 8), [s])
    out = cache.chunk_attention(0, torch.randn(1, 4, 3, 8), [s], mask=torch.zeros(1, 3, 5, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(out))  # a query that sees nothing: zeros
