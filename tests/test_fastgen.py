"""FastGen: profiling (hybrid recovery) and per-head plans against kvloom.reference; real
memory savings inside generate(); FastGen(recovery=1.0) == Full."""

import pytest
import torch
from hypothesis import given, strategies as st

import kvloom
from kvloom import reference as ref
from kvloom.policies.fastgen import hybrid_recovery

pytestmark = pytest.mark.hf  # drives transformers: also run against the oldest supported release


def _filled(Hkv, D, n, gen, dtype=torch.float32):
    cache = kvloom.KVCache(1, Hkv, D, dtype=dtype, block_size=4)
    s = cache.add_sequence()
    classes = torch.randint(0, 4, (n,), generator=gen).to(torch.uint8) * (torch.rand(n, generator=gen) < 0.3)
    cache.append(0, s, torch.randn(Hkv, n, D, generator=gen), torch.randn(Hkv, n, D, generator=gen), classes=classes)
    return cache, s


@given(
    heads=st.sampled_from([(2, 2), (6, 2), (9, 3)]),
    n=st.integers(1, 60),
    tq=st.integers(1, 8),
    r_frequent=st.floats(0.0, 1.0),
    local=st.integers(1, 30),
    seed=st.integers(0, 2**31 - 1),
)
def test_hybrid_recovery_matches_reference(heads, n, tq, r_frequent, local, seed):
    Hq, Hkv = heads
    G = Hq // Hkv
    tq = min(tq, n)
    g = torch.Generator().manual_seed(seed)
    cache, s = _filled(Hkv, 16, n, g)
    cache.accumulate_attention(0, torch.randn(1, Hq, 3 if n >= 3 else n, 16, generator=g), [s])
    q = torch.randn(1, Hq, tq, 16, generator=g)
    got = hybrid_recovery(cache, 0, q, [s], r_frequent=r_frequent, local_window=local)
    for h in range(Hkv):
        slots, ords, _ = cache.slots(0, h, s)
        k, _, gord, _ = cache.gather(0, h, s)
        by_ord = {int(o): i for i, o in enumerate(ords)}
        cls = cache.classes(0, h, s)
        sc = cache.scores(0, h, s)
        order = [by_ord[int(o)] for o in gord]
        expect = ref.fastgen_recovery(q[0, h * G:(h + 1) * G], k, gord.tolist(), [int(cls[i]) for i in order],
                                      [float(sc[i]) for i in order], n, r_frequent, local)
        assert got[0, h].tolist() == pytest.approx(expect, abs=1e-5)
        assert all(a <= b + 1e-9 for a, b in zip(got[0, h], got[0, h][1:]))  # nested hybrids


@given(
    heads=st.sampled_from([(2, 2), (6, 2), (9, 3)]),
    n=st.integers(1, 300),
    tq=st.integers(1, 300),
    B=st.integers(1, 2),
    r_frequent=st.floats(0.0, 1.0),
    local=st.integers(0, 80),
    evict=st.floats(0.0, 0.5),
    prior=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_accumulate_with_recovery_equals_the_two_calls(heads, n, tq, B, r_frequent, local, evict, prior, seed):
    """FastGen's prompt profiling in one pass (accumulate=True) leaves the scores that
    accumulate_attention leaves and returns the masses hybrid_recovery gives after it: over
    evicted keys, earlier scores, GQA and several rows."""
    Hq, Hkv = heads
    tq = min(tq, n)
    g = torch.Generator().manual_seed(seed)
    caches = [kvloom.KVCache(1, Hkv, 16, block_size=4) for _ in range(2)]
    classes = torch.randint(0, 4, (B, n), generator=g).to(torch.uint8) * (torch.rand(B, n, generator=g) < 0.3)
    k, v = torch.randn(B, Hkv, n, 16, generator=g), torch.randn(B, Hkv, n, 16, generator=g)
    drops = [[[i for i in range(n - tq) if torch.rand(1, generator=g).item() < evict] for _ in range(Hkv)]
             for _ in range(B)]
    q0, q = torch.randn(B, Hq, 2, 16, generator=g), torch.randn(B, Hq, tq, 16, generator=g)
    seqs = []
    for c in caches:
        seqs.append([c.add_sequence() for _ in range(B)])
        for b, s in enumerate(seqs[-1]):
            c.append(0, s, k[b, :, :n - tq], v[b, :, :n - tq], classes=classes[b, :n - tq])
            for h in range(Hkv):
                if drops[b][h]:
                    c.evict(0, h, s, drops[b][h])
            c.append(0, s, k[b, :, n - tq:], v[b, :, n - tq:], classes=classes[b, n - tq:])
        if prior and n >= 2:
            c.accumulate_attention(0, q0, seqs[-1])
    (one, two), (s1, s2) = caches, seqs
    two.accumulate_attention(0, q, s2)
    want = hybrid_recovery(two, 0, q, s2, r_frequent=r_frequent, local_window=local)
    got = hybrid_recovery(one, 0, q, s1, r_frequent=r_frequent, local_window=local, accumulate=True)
    for a, b in zip(s1, s2):
        for h in range(Hkv):
            assert one.slots(0, h, a)[0].tolist() == two.slots(0, h, b)[0].tolist()
            assert one.scores(0, h, a).tolist() == pytest.approx(two.scores(0, h, b).tolist(), rel=1e-5, abs=1e-6)
    assert got.ravel().tolist() == pytest.approx(want.ravel().tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="r_frequent"):  # checked before anything changes
        hybrid_recovery(one, 0, q, s1, r_frequent=2.0, local_window=local, accumulate=True)
    for a, b in zip(s1, s2):
        assert one.scores(0, 0, a).tolist() == pytest.approx(two.scores(0, 0, b).tolist(), rel=1e-5, abs=1e-6)


@given(level=st.integers(0, 4), r_frequent=st.floats(0.0, 1.0), local=st.integers(0, 20), steps=st.integers(1, 25),
       seed=st.integers(0, 2**31 - 1))
def test_fastgen_plan_keeps_reference_set(level, r_frequent, local, steps, seed):
    g = torch.Generator().manual_seed(seed)
    cache, s = _filled(2, 8, 10, g)
    for h in range(2):
        cache.set_head_plan(0, h, s, kvloom._core.make_plan("fastgen", {"level": level, "local_window": local, "r_frequent": r_frequent}))
    for _ in range(steps):
        cls = (torch.rand(1, generator=g) < 0.3).to(torch.uint8) * torch.randint(1, 4, (1,), generator=g).to(torch.uint8)
        cache.append(0, s, torch.randn(2, 1, 8, generator=g), torch.randn(2, 1, 8, generator=g), classes=cls)
        cache.accumulate_attention(0, torch.randn(1, 4, 1, 8, generator=g), [s])
        before = {h: (cache.slots(0, h, s)[1].tolist(), cache.classes(0, h, s).tolist(), cache.scores(0, h, s).tolist())
                  for h in range(2)}
        cache.apply_policy(0, s)
        for h in range(2):
            o, c, sc = before[h]
            expect = ref.fastgen_keep(level, o, c, sc, cache.seq_length(s), local, r_frequent)
            assert sorted(cache.slots(0, h, s)[1].tolist()) == expect


def test_fastgen_config_errors():
    for bad in (dict(recovery=0.0), dict(recovery=1.2), dict(r_local=0), dict(r_frequent=-0.1)):
        with pytest.raises(ValueError):
            kvloom.FastGen(**bad)
    with pytest.raises(ValueError, match="level"):
        kvloom._core.make_plan("fastgen", {"level": 5, "local_window": 1, "r_frequent": 0.3})
    assert kvloom.FastGen(0.9).choose([0.5, 0.8, 0.95, 0.99]) == 2
    assert kvloom.FastGen(1.0).choose([0.5, 0.8, 0.95, 0.99]) == 4


def test_fastgen_in_generate_frees_memory_and_reports_plans():
    from hf_helpers import generate, smollm2

    model, tok = smollm2()
    kvloom.enable(model)
    from hf_helpers import prompt
    enc = tok([prompt(tok, 300)], return_tensors="pt", add_special_tokens=False)
    with pytest.raises(ValueError, match="tokenizer"):
        kvloom.Cache(model, policy=kvloom.FastGen(0.9))
    full = kvloom.Cache(model)
    fg = kvloom.Cache(model, policy=kvloom.FastGen(0.9), tokenizer=tok)
    a = generate(model, enc, full, max_new_tokens=16, pad_token_id=tok.pad_token_id)
    b = generate(model, enc, fg, max_new_tokens=16, pad_token_id=tok.pad_token_id)
    plans = fg.stats()["sequences"][fg.seqs[0]]["plans"]
    chosen = {p for layer in plans for p in layer}
    assert all(p.startswith("fastgen:") for p in chosen)
    assert fg.memory_bytes() < full.memory_bytes()
    # the classes came from the token ids: the prompt's special tokens are marked
    assert (fg.kv.classes(0, 0, fg.seqs[0]) & 1).any()
    assert a.shape == b.shape
    model.set_attn_implementation("sdpa")


def test_fastgen_recovery_one_equals_full():
    from hf_helpers import generate, prompt, smollm2

    model, tok = smollm2()
    kvloom.enable(model)
    enc = tok([prompt(tok, 250)], return_tensors="pt", add_special_tokens=False)
    full = generate(model, enc, kvloom.Cache(model), max_new_tokens=32, pad_token_id=tok.pad_token_id)
    fg_cache = kvloom.Cache(model, policy=kvloom.FastGen(recovery=1.0), tokenizer=tok)
    fg = generate(model, enc, fg_cache, max_new_tokens=32, pad_token_id=tok.pad_token_id)
    assert torch.equal(full, fg)
    model.set_attn_implementation("sdpa")
