"""The memory budget (kv_budget): each policy's give-way rule against ``kvloom.reference``,
the selection against ``reference.budget_victims`` step by step, and the bound itself, on
float and quantized caches; then the transformers path."""
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import kvloom
from kvloom import _core
from kvloom import reference as ref



def plan_of(name, kw):
    return _core.make_plan(name, kw)


# one C++ plan per policy rule, with the parameters the reference needs
PLANS = {
    "full": ("full", {}),
    "window": ("window", {"sinks": 2, "recent": 1 << 20}),
    "heavy_hitter": ("heavy_hitter", {"ratio": 1.0, "recent": 3}),
    "fastgen": ("fastgen", {"level": 4, "local_window": 1, "r_frequent": 0.3}),
    "keep_set": ("keep_set", {"sinks": 3, "keep_all": 1}),
    "keep_set_subset": ("keep_set", {"sinks": 3, "recent": 1 << 20, "keep_all": 0}),
    "nats": ("nats", {"window": 1 << 20}),
}


def make_cache(kv_dtype, heads, D, bs, budget):
    return kvloom.KVCache(1, heads, D, block_size=bs, kv_dtype=kv_dtype, kv_budget=budget)


def set_plans(c, s, plans):
    for h, key in enumerate(plans):
        name, kw = PLANS[key]
        c.set_head_plan(0, h, s, plan_of(name, kw))


def head_state(c, s, h):
    slot, ord_, _, cls, score = c._c.live_slots(0, h, s)
    tier, value = c.give_way_keys(0, h, s)
    sealed = {e for e, x in enumerate(c.sealed_blocks(0, h, s)) if x} if c.kv_dtype else set()
    return {"slots": slot.tolist(), "ords": ord_.tolist(), "cls": cls.tolist(), "score": score.tolist(),
            "keys": list(zip(tier.tolist(), value.tolist())), "sealed": sealed}


def layer_bytes(c, s):
    n = 0
    for h in range(c.n_kv_heads):
        for b, sealed in zip(c.block_table(0, h, s), c.sealed_blocks(0, h, s)):
            if b >= 0:
                n += c.sealed_pool.block_bytes if sealed else c.pool.block_bytes
    return n


def fill(c, s, g, n, heads, D, plans):
    k = torch.randn(heads, n, D, generator=g)
    v = torch.randn(heads, n, D, generator=g)
    cls = torch.randint(0, 3, (heads, n), generator=g, dtype=torch.uint8)
    c.append(0, s, k, v, classes=cls)
    if any(p in ("heavy_hitter", "fastgen") for p in plans):
        c.accumulate_attention(0, torch.randn(1, heads, 1, D, generator=g), [s])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kv_dtype=st.sampled_from([None, "int8", "int4", "int2"]), heads=st.integers(1, 3), D=st.sampled_from([8, 32]),
       bs=st.sampled_from([4, 8]), budget=st.floats(0.05, 1.0), seed=st.integers(0, 2**31 - 1),
       plans=st.lists(st.sampled_from(list(PLANS)), min_size=3, max_size=3),
       chunks=st.lists(st.integers(1, 9), min_size=2, max_size=10))
# a quantized cache packs its float rows so full blocks seal (held blocks == needed ones, one not full)
@example(kv_dtype="int8", heads=3, D=8, bs=4, budget=0.4375, seed=0, plans=["full"] * 3, chunks=[1, 9, 3])
def test_budget_matches_reference_step_by_step(kv_dtype, heads, D, bs, budget, seed, plans, chunks):
    """At every step the budgeted cache frees exactly what reference.budget_victims picks from
    the state the plans alone leave (a copy without a budget), and then fits its budget."""
    plans = plans[:heads]
    g = torch.Generator().manual_seed(seed)
    c = make_cache(kv_dtype, heads, D, bs, budget)
    free = make_cache(kv_dtype, heads, D, bs, None)  # the same state, then the plans alone
    s = c.add_sequence()
    set_plans(c, s, plans)
    for n in chunks:
        fill(c, s, g, n, heads, D, plans)
        (t,) = free._c.import_sequences(c._c.export_sequences([s]), False)
        free.apply_policy(0, t)
        before = [head_state(free, t, h) for h in range(heads)]
        for h, st_ in enumerate(before):  # the rule: every key as the reference states it
            name, kw = PLANS[plans[h]]
            appended = c.seq_length(s)
            want = [ref.give_way_key(name, kw, ord=o, appended=appended, score=sc, cls=cl)
                    for o, sc, cl in zip(st_["ords"], st_["score"], st_["cls"])]
            assert st_["keys"] == want, plans[h]
        qbb = c.sealed_pool.block_bytes if kv_dtype else 0
        limit = ref.budget_bytes(budget, c.seq_length(s), heads, bs, c.pool.block_bytes, qbb)
        assert c.budget_bytes(c.seq_length(s)) == limit
        expect = [set() for _ in range(heads)]
        if layer_bytes(free, t) > limit:
            picked = ref.budget_victims(before, limit, bs, c.pool.block_bytes, qbb if kv_dtype else None,
                                       int(kv_dtype[3:]) if kv_dtype else 0)
            expect = [{st_["ords"][st_["slots"].index(sl)] for sl in p} for st_, p in zip(before, picked)]
        c.apply_policy(0, s)
        for h in range(heads):
            got = set(before[h]["ords"]) - set(c.slots(0, h, s)[1].tolist())
            assert got == expect[h], f"head {h} ({plans[h]})"
            assert set(c.slots(0, h, s)[1].tolist()) <= set(before[h]["ords"])
        assert layer_bytes(c, s) <= limit
        free.drop(t)


@settings(max_examples=25, deadline=None)
@given(kv_dtype=st.sampled_from([None, "int4", "int2"]), budget=st.floats(0.1, 0.9), seed=st.integers(0, 2**31 - 1),
       ops=st.lists(st.sampled_from(["append", "append", "fork", "rollback", "drop"]), min_size=3, max_size=12))
def test_budget_holds_through_forks_and_rollbacks(kv_dtype, budget, seed, ops):
    """Forks share blocks (the budget's projection can be short of what compaction achieves):
    every sequence still ends each step within its budget, its tokens a subset of what it
    held, and attention over it equals the reference over what it kept."""
    heads, D, bs = 2, 16, 4
    g = torch.Generator().manual_seed(seed)
    c = kvloom.KVCache(1, heads, D, block_size=bs, kv_dtype=kv_dtype, kv_budget=budget, policy=kvloom.Window(2, 1 << 20))
    seqs = [c.add_sequence()]
    for op in ops:
        s = seqs[int(torch.randint(len(seqs), (1,), generator=g))]
        if op == "fork" and len(seqs) < 4:
            seqs.append(c.fork(s))
        elif op == "rollback" and c.seq_length(s) > 1:
            c.rollback(s, 1)
        elif op == "drop" and len(seqs) > 1:
            c.drop(s)
            seqs.remove(s)
        else:
            n = int(torch.randint(1, 8, (1,), generator=g))
            c.append(0, s, torch.randn(heads, n, D, generator=g), torch.randn(heads, n, D, generator=g))
            held = [set(c.slots(0, h, s)[1].tolist()) for h in range(heads)]
            c.apply_policy(0, s)
            assert layer_bytes(c, s) <= c.budget_bytes(c.seq_length(s))
            for h in range(heads):
                assert set(c.slots(0, h, s)[1].tolist()) <= held[h]
                assert c.seq_length(s) - 1 in set(c.slots(0, h, s)[1].tolist())  # the newest stays
            q = torch.randn(1, heads, D, generator=g)
            got = c.attend(0, q, [s])
            for h in range(heads):
                k, v = c.gather(0, h, s)[:2]
                want = ref.decode_attention(q[:, h:h + 1], k[None, None], v[None, None])
                torch.testing.assert_close(got[:, h:h + 1].double(), want, rtol=1e-5, atol=1e-5)


def test_budget_of_one_changes_nothing_for_any_policy():
    """kv_budget=1.0 never binds (every policy holds at most Full's bytes)."""
    g = torch.Generator().manual_seed(0)
    for pol in (kvloom.Full(), kvloom.Window(2, 9), kvloom.HeavyHitter(0.3, 4)):
        a = kvloom.KVCache(2, 2, 16, block_size=4, policy=pol, kv_budget=1.0)
        b = kvloom.KVCache(2, 2, 16, block_size=4, policy=pol)
        sa, sb = a.add_sequence(), b.add_sequence()
        for n in (7, 1, 1, 5, 1, 1, 1):
            k, v = torch.randn(2, n, 16, generator=g), torch.randn(2, n, 16, generator=g)
            for c, s in ((a, sa), (b, sb)):
                for layer in range(2):
                    c.append(layer, s, k, v)
                    if pol.needs_scores:
                        c.accumulate_attention(layer, torch.ones(1, 2, 1, 16), [s])
                    c.apply_policy(layer, s)
        assert a.lengths(sa) == b.lengths(sb)
        assert a.memory_bytes() == b.memory_bytes()


def test_budget_sizes_from_full_tokens_and_layer_window():
    c = kvloom.KVCache(2, 1, 8, block_size=4, kv_budget=0.5)
    s = c.add_sequence()
    c.set_layer_window(1, 4)
    c.append(0, s, torch.randn(1, 16, 8), torch.randn(1, 16, 8))
    c.append(1, s, torch.randn(1, 16, 8), torch.randn(1, 16, 8))
    c.apply_policy(0, s, full_tokens=8)  # the caller says Full holds 8 (e.g. 8 were padding)
    assert c.length(0, 0, s) == 4  # half of 2 blocks: 1 block
    c.apply_policy(1, s)  # the window holds 4 (1 block): half of that is below the floor of 1 block
    assert c.length(1, 0, s) == 4


def test_budget_bad_input():
    for bad in (0, -0.5, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="kv_budget"):
            kvloom.KVCache(1, 1, 8, kv_budget=bad)
    for bad in ("0.5", True, [0.5]):
        with pytest.raises(TypeError, match="kv_budget"):
            kvloom.KVCache(1, 1, 8, kv_budget=bad)
    c = kvloom.KVCache(1, 1, 8, kv_budget=0.5)
    s = c.add_sequence()
    c.append(0, s, torch.randn(1, 3, 8), torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="full_tokens"):
        c.apply_policy(0, s, full_tokens=-2)
    assert c.length(0, 0, s) == 3
    with pytest.raises(ValueError, match="no kv_budget"):
        kvloom.KVCache(1, 1, 8).budget_bytes(10)
    assert c.kv_budget == 0.5 and c.stats()["kv_budget"] == 0.5


def test_budget_survives_snapshots(tmp_path):
    c = kvloom.KVCache(1, 2, 8, block_size=4, kv_budget=0.25, kv_dtype="int8", policy=kvloom.Window(1, 100))
    s = c.add_sequence()
    c.append(0, s, torch.randn(2, 40, 8), torch.randn(2, 40, 8))
    c.apply_policy(0, s)
    c.save(tmp_path / "c.kvl")
    d = kvloom.KVCache.load(tmp_path / "c.kvl")
    assert d.kv_budget == 0.25 and d.kv_dtype == "int8"
    assert d.lengths(s) == c.lengths(s) and d.memory_bytes() == c.memory_bytes()


@pytest.mark.hf
@pytest.mark.parametrize("kv_dtype", [None, "int4"])
def test_transformers_cache_keeps_its_budget(kv_dtype):
    """kvloom.Cache(model, kv_budget=...) on a tiny Llama with a padded batch: after every
    forward each layer of each row holds at most the budget of the row's real tokens."""
    from hf_helpers import generate, tiny_model

    model = tiny_model("qwen3")
    kvloom.enable(model)
    ids = torch.randint(3, 200, (2, 70), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :13] = 0  # row 1: 13 tokens of left padding
    cache = kvloom.Cache(model, policy=kvloom.Full(), kv_dtype=kv_dtype, kv_budget=0.3, block_size=8)
    out = generate(model, {"input_ids": ids, "attention_mask": mask}, cache, max_new_tokens=12)
    kv = cache.kv
    for b, s in enumerate(cache.seqs):
        real = out.shape[1] - 1 - (13 if b == 1 else 0)  # the last token is not in the cache yet
        for layer in range(kv.n_layers):
            n = 0
            for h in range(kv.n_kv_heads):
                for blk, sealed in zip(kv.block_table(layer, h, s), kv.sealed_blocks(layer, h, s)):
                    if blk >= 0:
                        n += kv.sealed_pool.block_bytes if sealed else kv.pool.block_bytes
            assert n <= kv.budget_bytes(real), (b, layer)
            assert 0 < kv.length(layer, 0, s) < real
