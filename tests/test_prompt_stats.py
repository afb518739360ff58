"""Prompt statistics at prompt lengths (tiled, multi-threaded C++): accumulated attention and
FastGen's hybrid recovery for several sequences at once, long prompts and GQA groups, both
kernel paths, against kvloom.reference."""
import contextlib

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

import kvloom
from kvloom import _core
from kvloom import reference as ref
from kvloom.policies.fastgen import hybrid_recovery


@contextlib.contextmanager
def _kernels(generic: bool):
    _core.force_generic_kernels(generic)
    try:
        yield
    finally:
        _core.force_generic_kernels(False)


def _prompts(Hkv, D, lengths, gen, dtype):
    cache = kvloom.KVCache(1, Hkv, D, dtype=dtype, block_size=16)
    seqs = []
    for n in lengths:
        s = cache.add_sequence()
        classes = torch.randint(0, 4, (n,), generator=gen).to(torch.uint8) * (torch.rand(n, generator=gen) < 0.2)
        # keys with a few strong directions, so attention is peaked as in a real model
        k = torch.randn(Hkv, n, D, generator=gen) * (1 + 3 * (torch.rand(Hkv, n, 1, generator=gen) < 0.05))
        cache.append(0, s, k, torch.randn(Hkv, n, D, generator=gen), classes=classes)
        seqs.append(s)
    return cache, seqs


def _by_ord(cache, h, s, values):
    _, ords, _ = cache.slots(0, h, s)
    got = dict(zip(ords.tolist(), values))
    _, _, gord, _ = cache.gather(0, h, s)
    return [got[o] for o in gord.tolist()]


@pytest.mark.slow
@settings(max_examples=6, deadline=None)
@given(
    heads=st.sampled_from([(9, 3), (8, 1), (4, 4)]),
    D=st.sampled_from([64, 40, 12]),
    n=st.integers(300, 4096),
    full_prompt=st.booleans(),
    generic=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    seed=st.integers(0, 2**31 - 1),
)
@example(heads=(9, 3), D=64, n=4096, full_prompt=True, generic=False, dtype=torch.float32, seed=1)
def test_long_prompt_statistics_match_reference(heads, D, n, full_prompt, generic, dtype, seed):
    Hq, Hkv = heads
    G = Hq // Hkv
    g = torch.Generator().manual_seed(seed)
    lengths = [n, max(1, n // 3)]  # two sequences of different lengths in one call
    tq = lengths[1] if full_prompt else min(lengths[1], 37)
    cache, seqs = _prompts(Hkv, D, lengths, g, dtype)
    q = torch.randn(2, Hq, tq, D, generator=g)
    with _kernels(generic):
        cache.accumulate_attention(0, q, seqs)
        masses = hybrid_recovery(cache, 0, q, seqs, r_frequent=0.3, local_window=max(1, n // 4))
    for b, (s, length) in enumerate(zip(seqs, lengths)):
        for h in [0, Hkv - 1]:
            k, _, gord, _ = cache.gather(0, h, s, dtype=torch.float32)
            qg = q[b, h * G:(h + 1) * G]
            expect = ref.accumulated_attention(qg, k, gord.tolist(), length)
            got = torch.tensor(_by_ord(cache, h, s, cache.scores(0, h, s).tolist()), dtype=torch.float64)
            torch.testing.assert_close(got, expect, atol=2e-4, rtol=1e-4)
            cls = _by_ord(cache, h, s, cache.classes(0, h, s).tolist())
            sc = got.tolist()
            want = ref.fastgen_recovery(qg, k, gord.tolist(), cls, sc, length, 0.3, max(1, n // 4))
            assert masses[b, h].tolist() == pytest.approx(want, abs=2e-5)


def test_statistics_skip_queries_that_see_nothing():
    """Keys newer than every query (evicted prefix, queries older than all keys) add nothing."""
    cache = kvloom.KVCache(1, 1, 16, block_size=4)
    s = cache.add_sequence()
    cache.append(0, s, torch.randn(1, 10, 16), torch.randn(1, 10, 16))
    cache.evict(0, 0, s, list(range(8)))  # keys 8, 9 remain
    q = torch.randn(1, 1, 10, 16)  # queries are tokens 0..9: only 8 and 9 see a key
    cache.accumulate_attention(0, q, [s])
    assert sum(cache.scores(0, 0, s)) == pytest.approx(2.0, abs=1e-6)
    assert hybrid_recovery(cache, 0, q, [s], r_frequent=0.0, local_window=1)[0, 0, 3] == pytest.approx(
        ref.fastgen_recovery(q[0], cache.gather(0, 0, s)[0], [8, 9], [0, 0], [0.0, 0.0], 10, 0.0, 1)[3], abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(heads=st.sampled_from([(9, 3), (4, 4), (8, 2), (6, 1), (14, 2)]), D=st.sampled_from([64, 128, 80, 32]),
       lengths=st.lists(st.integers(1, 300), min_size=1, max_size=3),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       kv_dtype=st.sampled_from([None, None, "int8", "int4"]), evict=st.floats(0, 0.7), seed=st.integers(0, 10_000))
def test_fused_decode_accumulation_equals_two_passes(isa, heads, D, lengths, dtype, kv_dtype, evict, seed):
    """attend(accumulate=True) gives the output of attend and adds the scores
    accumulate_attention adds, on every kernel path (the fused pass reads the weights the
    kernels leave in their scratch: kernels.h)."""
    Hq, Hkv = heads
    if kv_dtype and D % 32:
        D = 64  # quantized blocks group channels by 32
    g = torch.Generator().manual_seed(seed)
    caches = [kvloom.KVCache(1, Hkv, D, dtype=dtype, block_size=16, kv_dtype=kv_dtype) for _ in range(2)]
    seqs = [[c.add_sequence() for _ in lengths] for c in caches]
    for i, n in enumerate(lengths):
        k, v = torch.randn(Hkv, n, D, generator=g), torch.randn(Hkv, n, D, generator=g)
        drops = [[int(x) for x in range(n) if torch.rand(1, generator=g).item() < evict] for _ in range(Hkv)]
        for c, ss in zip(caches, seqs):
            c.append(0, ss[i], k, v)
            c.accumulate_attention(0, torch.randn(1, Hq, 1, D, generator=torch.Generator().manual_seed(i)), [ss[i]])
            for h in range(Hkv):
                slots, ords, _ = c.slots(0, h, ss[i])
                sel = [int(s) for s, o in zip(slots, ords) if int(o) in drops[h][:-1]]
                if sel:
                    c.evict(0, h, ss[i], sel)
    q = (torch.randn(len(lengths), Hq, D, generator=g) * 2).to(dtype)
    want = caches[0].attend(0, q, seqs[0])
    caches[0].accumulate_attention(0, q[:, :, None], seqs[0])
    got = caches[1].attend(0, q, seqs[1], accumulate=True)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    for s0, s1 in zip(*seqs):
        for h in range(Hkv):
            a, b = caches[0].scores(0, h, s0), caches[1].scores(0, h, s1)
            torch.testing.assert_close(torch.from_numpy(b), torch.from_numpy(a), atol=2e-6, rtol=2e-5)


def test_fused_decode_accumulation_refuses_views_and_repeats():
    cache = kvloom.KVCache(1, 2, 16)
    s = cache.add_sequence()
    cache.append(0, s, torch.randn(2, 4, 16), torch.randn(2, 4, 16))
    with pytest.raises(ValueError, match="segment views"):
        cache.attend(0, torch.randn(1, 4, 16), [[(s, 0)]], accumulate=True)
    with pytest.raises(ValueError, match="named twice"):
        cache.attend(0, torch.randn(2, 4, 16), [s, s], accumulate=True)
    before = cache.scores(0, 0, s).copy()
    with pytest.raises(ValueError):
        cache.attend(0, torch.randn(1, 4, 8), [s], accumulate=True)
    assert (cache.scores(0, 0, s) == before).all()
