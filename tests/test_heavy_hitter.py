"""H2O: accumulated attention per slot (C++) and the heavy-hitter policy, against the reference."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

import kvloom
from kvloom import reference as ref

pytestmark = pytest.mark.hf  # drives transformers: also run against the oldest supported release


@given(
    heads=st.sampled_from([(2, 2), (6, 2), (9, 3), (4, 1)]),
    D=st.sampled_from([8, 64]),
    n=st.integers(1, 80),
    tq=st.integers(1, 6),
    evict=st.integers(0, 20),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_accumulated_attention_matches_reference(isa, heads, D, n, tq, evict, dtype, seed):
    Hq, Hkv = heads
    G = Hq // Hkv
    tq = min(tq, n)
    g = torch.Generator().manual_seed(seed)
    cache = kvloom.KVCache(1, Hkv, D, dtype=dtype, block_size=4)
    s = cache.add_sequence()
    cache.append(0, s, torch.randn(Hkv, n, D, generator=g), torch.randn(Hkv, n, D, generator=g))
    for h in range(Hkv):  # ragged heads: evict some old tokens (never the queries' own)
        slots, ords, _ = cache.slots(0, h, s)
        victims = [int(sl) for sl, o in zip(slots, ords) if o < n - tq][: evict * (h + 1) // Hkv]
        cache.evict(0, h, s, victims)
    q = torch.randn(1, Hq, tq, D, generator=g)
    cache.accumulate_attention(0, q, [s])
    cache.accumulate_attention(0, q, [s])  # scores accumulate
    for h in range(Hkv):
        k, _, ords, _ = cache.gather(0, h, s, dtype=torch.float32)
        expect = 2 * ref.accumulated_attention(q[0, h * G:(h + 1) * G], k, ords.tolist(), n)
        slots, slot_ords, _ = cache.slots(0, h, s)
        got = dict(zip(slot_ords.tolist(), cache.scores(0, h, s).tolist()))
        got = torch.tensor([got[o] for o in ords.tolist()], dtype=torch.float64)
        torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-4)
        # every query's probabilities sum to 1: total mass = 2 x G x tq
        assert math.isclose(got.sum().item(), 2 * G * tq, rel_tol=1e-4)


@given(
    ratio=st.floats(0.0, 1.0),
    recent=st.integers(1, 12),
    steps=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
)
def test_heavy_hitter_policy_matches_reference(ratio, recent, steps, seed):
    g = torch.Generator().manual_seed(seed)
    D, Hkv, Hq = 8, 2, 4
    cache = kvloom.KVCache(1, Hkv, D, policy=kvloom.HeavyHitter(ratio, recent), block_size=4)
    s = cache.add_sequence()
    for step in range(steps):
        n = 5 if step == 0 else 1
        cache.append(0, s, torch.randn(Hkv, n, D, generator=g), torch.randn(Hkv, n, D, generator=g))
        cache.accumulate_attention(0, torch.randn(1, Hq, n, D, generator=g), [s])
        before = {h: (cache.slots(0, h, s)[1].tolist(), cache.scores(0, h, s).tolist()) for h in range(Hkv)}
        cache.apply_policy(0, s)
        for h in range(Hkv):
            ords, scores = before[h]
            expect = ref.heavy_hitter_keep(ords, scores, cache.seq_length(s), ratio, recent)
            assert sorted(cache.slots(0, h, s)[1].tolist()) == expect
    total = cache.seq_length(s)
    assert cache.length(0, 0, s) <= recent + math.ceil(ratio * total)


def test_heavy_hitter_frees_memory_in_generate():
    from hf_helpers import generate, tiny_model

    model = kvloom.enable(tiny_model("llama"))
    ids = torch.randint(3, 250, (1, 150), generator=torch.Generator().manual_seed(9))
    full, h2o = kvloom.Cache(model), kvloom.Cache(model, policy=kvloom.HeavyHitter(0.1, 20))
    generate(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, full, max_new_tokens=8)
    generate(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, h2o, max_new_tokens=8)
    n = h2o.get_seq_length()
    assert n == 157
    for per_head in h2o.kv.lengths(h2o.seqs[0]):
        assert per_head == [20 + math.ceil(0.1 * n)] * 2
    assert h2o.memory_bytes() < full.memory_bytes() / 2


def test_heavy_hitter_bad_input():
    with pytest.raises(ValueError, match="ratio"):
        kvloom.HeavyHitter(1.5, 10)
    with pytest.raises(ValueError, match="recent"):
        kvloom.HeavyHitter(0.1, 0)
    cache = kvloom.KVCache(1, 2, 8)
    s = cache.add_sequence()
    cache.append(0, s, torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="more queries than tokens"):
        cache.accumulate_attention(0, torch.randn(1, 2, 4, 8), [s])
    with pytest.raises(ValueError, match="named twice"):
        cache.accumulate_attention(0, torch.randn(2, 2, 1, 8), [s, s])
    with pytest.raises(ValueError, match="tokens, head_dim"):
        cache.accumulate_attention(0, torch.randn(1, 2, 8), [s])
    assert cache.scores(0, 0, s).tolist() == [0.0, 0.0, 0.0]  # nothing changed
