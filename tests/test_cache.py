"""The paged cache against kvloom.reference.CacheModel: contents, lengths, refcounts, memory."""
import threading
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import kvloom
from kvloom import reference as ref

L, H, D, BS = 2, 2, 8, 4


def check_consistent(cache: kvloom.KVCache, model: ref.CacheModel):
    """Everything observable in `cache` agrees with `model`, and block accounting is exact."""
    assert sorted(cache.sequences()) == sorted(model.seqs)
    refs = Counter()
    for s in model.seqs:
        for layer in range(cache.n_layers):
            for h in range(cache.n_kv_heads):
                mk, mv, mord, mpos = model.contents(layer, h, s)
                k, v, ords, pos = cache.gather(layer, h, s)
                assert cache.length(layer, h, s) == model.length(layer, h, s)
                assert ords.tolist() == mord and pos.tolist() == mpos
                if mk is not None:
                    assert torch.equal(k, mk) and torch.equal(v, mv)
                table = [b for b in cache.block_table(layer, h, s) if b >= 0]
                # every live token needs a slot: at least ceil(len / block_size) blocks
                assert len(table) >= -(-model.length(layer, h, s) // cache.block_size)
                # no block is held without a live slot in it
                slots, _, _ = cache.slots(layer, h, s)
                assert set(table) == {cache.block_table(layer, h, s)[sl // cache.block_size] for sl in slots}
                refs.update(table)
    for b, n in refs.items():
        assert cache.pool.refcount(b) == n, f"block {b}: refcount {cache.pool.refcount(b)} != {n} references"
    assert cache.blocks_held() == len(refs)
    assert cache.pool.used_blocks == len(refs)  # this pool serves only this cache
    assert cache.memory_bytes() == len(refs) * cache.pool.block_bytes


class CacheMachine(RuleBasedStateMachine):
    """Random interleavings of add / fork / drop / append / evict / rollback."""

    def __init__(self):
        super().__init__()
        self.pool = kvloom.BlockPool("float32", D, BS, capacity_blocks=48, chunk_blocks=5)
        self.cache = kvloom.KVCache(L, H, D, pool=self.pool)
        self.model = ref.CacheModel(L, H)
        self.counter = 0

    def _tokens(self, n):
        base = torch.arange(self.counter, self.counter + H * n * D, dtype=torch.float32).view(H, n, D)
        self.counter += H * n * D
        return base / 7.0, -base / 3.0

    @initialize()
    def first(self):
        assert self.cache.add_sequence() == self.model.add()

    @rule()
    def add(self):
        assert self.cache.add_sequence() == self.model.add()

    @precondition(lambda self: self.model.seqs)
    @rule(data=st.data())
    def fork(self, data):
        s = data.draw(st.sampled_from(sorted(self.model.seqs)))
        assert self.cache.fork(s) == self.model.fork(s)

    @precondition(lambda self: self.model.seqs)
    @rule(data=st.data())
    def drop(self, data):
        s = data.draw(st.sampled_from(sorted(self.model.seqs)))
        self.cache.drop(s)
        self.model.drop(s)

    @precondition(lambda self: self.model.seqs)
    @rule(data=st.data(), n=st.integers(1, 11), layer=st.integers(0, L - 1), with_pos=st.booleans())
    def append(self, data, n, layer, with_pos):
        s = data.draw(st.sampled_from(sorted(self.model.seqs)))
        k, v = self._tokens(n)
        pos = torch.arange(n, dtype=torch.int32) * 3 + 1000 if with_pos else None
        before = self.pool.used_blocks
        try:
            self.cache.append(layer, s, k, v, pos)
        except kvloom.CapacityError:
            assert self.pool.used_blocks == before  # nothing allocated, nothing changed
            check_consistent(self.cache, self.model)
            return
        self.model.append(layer, s, k, v, pos)

    @precondition(lambda self: len(self.model.seqs) >= 2)
    @rule(data=st.data(), n=st.integers(1, 6), layer=st.integers(0, L - 1))
    def concurrent_appends(self, data, n, layer):
        """Hogwild!-style: threads append into different sequences at once (the GIL is
        released in append); each append either lands whole or raises CapacityError."""
        seqs = data.draw(st.lists(st.sampled_from(sorted(self.model.seqs)), min_size=2, max_size=4, unique=True))
        toks = [self._tokens(n) for _ in seqs]
        ok = [None] * len(seqs)
        barrier = threading.Barrier(len(seqs))

        def run(i):
            barrier.wait()
            try:
                self.cache.append(layer, seqs[i], *toks[i])
                ok[i] = True
            except kvloom.CapacityError:
                ok[i] = False

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(seqs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(o is not None for o in ok)
        for i, s in enumerate(seqs):
            if ok[i]:
                self.model.append(layer, s, *toks[i], None)

    @precondition(lambda self: self.model.seqs)
    @rule(data=st.data(), layer=st.integers(0, L - 1), h=st.integers(0, H - 1))
    def evict(self, data, layer, h):
        s = data.draw(st.sampled_from(sorted(self.model.seqs)))
        slots, ords, _ = self.cache.slots(layer, h, s)
        if len(slots) == 0:
            return
        idx = data.draw(st.lists(st.integers(0, len(slots) - 1), unique=True, max_size=len(slots)))
        self.cache.evict(layer, h, s, slots[idx])
        self.model.evict_ords(layer, h, s, ords[idx].tolist())

    @precondition(lambda self: self.model.seqs)
    @rule(data=st.data(), n=st.integers(0, 12))
    def rollback(self, data, n):
        s = data.draw(st.sampled_from(sorted(self.model.seqs)))
        if any(n > hd.appended for hd in self.model.seqs[s]):
            with pytest.raises(ValueError):
                self.cache.rollback(s, n)
            return
        self.cache.rollback(s, n)
        self.model.rollback(s, n)

    @invariant()
    def consistent(self):
        check_consistent(self.cache, self.model)

    def teardown(self):
        for s in list(self.model.seqs):
            self.cache.drop(s)
        assert self.pool.used_blocks == 0, "blocks leaked after every sequence was dropped"
        assert self.cache.memory_bytes() == 0


TestCacheMachine = CacheMachine.TestCase


@given(
    sinks=st.integers(0, 6),
    recent=st.integers(1, 20),
    chunks=st.lists(st.integers(1, 30), min_size=1, max_size=12),
    block_size=st.sampled_from([1, 4, 16]),
)
def test_window_policy_matches_reference(sinks, recent, chunks, block_size):
    cache = kvloom.KVCache(2, 2, 8, policy=kvloom.Window(sinks, recent), block_size=block_size)
    model = ref.CacheModel(2, 2)
    s = cache.add_sequence()
    model.add()
    t = 0
    for n in chunks:
        k = torch.arange(t, t + 2 * n * 8, dtype=torch.float32).view(2, n, 8)
        t += 2 * n * 8
        for layer in range(2):
            cache.append(layer, s, k, k + 0.5)
            model.append(layer, s, k, k + 0.5)
            freed = cache.apply_policy(layer, s)
            before = model.length(layer, 0, s) + model.length(layer, 1, s)
            model.apply_window(layer, s, sinks, recent)
            assert freed == before - model.length(layer, 0, s) - model.length(layer, 1, s)
    check_consistent(cache, model)
    # memory really shrinks: each head holds sinks + recent tokens, and since new tokens
    # refill the lowest free slots its table never outgrows the largest live set
    bound = -(-(sinks + recent + max(chunks)) // block_size)
    for layer in range(2):
        for h in range(2):
            assert cache.length(layer, h, s) == min(model.head(layer, h, s).appended, sinks + recent)
            assert len(cache.block_table(layer, h, s)) <= bound


def test_window_frees_real_memory():
    full = kvloom.KVCache(1, 1, 64, block_size=16)
    win = kvloom.KVCache(1, 1, 64, block_size=16, policy=kvloom.Window(4, 60))
    sf, sw = full.add_sequence(), win.add_sequence()
    for _ in range(1000):
        kv = torch.randn(1, 1, 64)
        full.append(0, sf, kv, kv)
        win.append(0, sw, kv, kv)
        win.apply_policy(0, sw)
    assert full.memory_bytes() == 63 * full.pool.block_bytes  # ceil(1000 / 16) blocks
    # 64 live tokens; freed slots are reused, so only a few partially filled blocks remain
    assert win.length(0, 0, sw) == 64
    assert win.memory_bytes() <= 8 * win.pool.block_bytes


def test_fork_is_copy_on_write():
    cache = kvloom.KVCache(1, 2, 8, block_size=4)
    bb = cache.pool.block_bytes
    a = cache.add_sequence()
    cache.append(0, a, torch.ones(2, 6, 8), torch.ones(2, 6, 8))  # 2 blocks per head, tail half full
    assert cache.memory_bytes() == 4 * bb
    b = cache.fork(a)
    assert cache.memory_bytes() == 4 * bb  # shared, nothing copied
    assert all(cache.pool.refcount(x) == 2 for x in cache.block_table(0, 0, a))
    cache.append(0, b, torch.full((2, 1, 8), 2.0), torch.full((2, 1, 8), 2.0))
    assert cache.memory_bytes() == 6 * bb  # b copied its tail block in each head
    ka, _, _, _ = cache.gather(0, 0, a)
    kb, _, _, _ = cache.gather(0, 0, b)
    assert ka.shape[0] == 6 and kb.shape[0] == 7 and torch.all(ka == 1) and torch.all(kb[6] == 2)
    cache.append(0, a, torch.full((2, 1, 8), 3.0), torch.full((2, 1, 8), 3.0))
    assert cache.memory_bytes() == 6 * bb  # a's tail is exclusive again: written in place
    cache.drop(b)
    assert cache.memory_bytes() == 4 * bb
    cache.rollback(a, 7)
    assert cache.memory_bytes() == 0 and cache.seq_length(a) == 0


def test_capacity_error_leaves_cache_intact():
    pool = kvloom.BlockPool("float16", 16, 4, capacity_blocks=5)
    cache = kvloom.KVCache(1, 2, 16, pool=pool)
    s = cache.add_sequence()
    cache.append(0, s, torch.randn(2, 8, 16), torch.randn(2, 8, 16))  # 4 blocks
    k_before = [cache.gather(0, h, s) for h in range(2)]
    with pytest.raises(kvloom.CapacityError, match="exhausted"):
        cache.append(0, s, torch.randn(2, 4, 16), torch.randn(2, 4, 16))  # needs 2 more, 1 left
    assert pool.used_blocks == 4 and cache.seq_length(s) == 8
    for h in range(2):
        after = cache.gather(0, h, s)
        assert all(torch.equal(x, y) for x, y in zip(k_before[h], after))
    c = cache.fork(s)
    with pytest.raises(kvloom.CapacityError):  # copy-on-write needs 2 blocks, 1 left
        cache.append(0, c, torch.randn(2, 1, 16), torch.randn(2, 1, 16))
    cache.append(0, s, torch.randn(2, 0, 16), torch.randn(2, 0, 16))  # empty append is fine
    assert cache.length(0, 0, c) == 8 and pool.used_blocks == 4


def test_dtype_conversion_on_append():
    for store in (torch.float16, torch.bfloat16):
        cache = kvloom.KVCache(1, 1, 8, dtype=store)
        s = cache.add_sequence()
        x = torch.randn(1, 5, 8)
        cache.append(0, s, x, x * 2)
        k, v, _, _ = cache.gather(0, 0, s, dtype=torch.float32)
        assert torch.equal(k, x[0].to(store).float()) and torch.equal(v, (x[0] * 2).to(store).float())


def test_numpy_inputs_and_stats():
    cache = kvloom.KVCache(2, 1, 4, policy="window")
    s = cache.add_sequence()
    cache.append(1, s, np.ones((1, 3, 4), np.float32), np.ones((1, 3, 4), np.float32), positions=np.arange(3) + 10)
    st_ = cache.stats()
    assert st_["sequences"][s]["live"] == [[0], [3]]
    assert st_["sequences"][s]["plans"][0] == ["window"]
    assert cache.slots(1, 0, s)[2].tolist() == [10, 11, 12]
    assert "KVCache(" in repr(cache)


@pytest.mark.parametrize("fork_first", [False, True])
def test_policy_eviction_compacts_scattered_heads(fork_first):
    """Keeping every third token frees two thirds of the blocks (live tokens are moved into
    free slots of exclusively owned blocks); a forked parent is never written."""
    cache = kvloom.KVCache(1, 2, 8, block_size=4)
    s = cache.add_sequence()
    n = 60
    k = torch.arange(2 * n * 8, dtype=torch.float32).view(2, n, 8)
    classes = torch.tensor([1 if i % 3 == 0 else 0 for i in range(n)], dtype=torch.uint8)
    cache.append(0, s, k, -k, classes=classes)
    parent = None
    if fork_first:
        parent, s = s, cache.fork(s)
        before = [cache.gather(0, h, parent) for h in range(2)]
    for h in range(2):
        cache.set_head_plan(0, h, s, kvloom._core.make_plan("fastgen", {"level": 0, "local_window": 0, "r_frequent": 0.0}))  # keep special tokens only
    cache.apply_policy(0, s)

    def check_child(blocks):
        for h in range(2):
            kk, vv, ords, _ = cache.gather(0, h, s)
            assert ords.tolist() == list(range(0, n, 3))
            assert torch.equal(kk, k[h, ::3]) and torch.equal(vv, -k[h, ::3])
            assert len([b for b in cache.block_table(0, h, s) if b >= 0]) == blocks

    if fork_first:
        # blocks shared with the parent are never written: the child keeps referencing them
        check_child(15)
        for h in range(2):
            assert all(torch.equal(x, y) for x, y in zip(before[h], cache.gather(0, h, parent)))
        assert cache.memory_bytes() == 2 * 15 * cache.pool.block_bytes
        cache.drop(parent)
        cache.apply_policy(0, s)  # now exclusive: compacted on the next policy pass
    check_child(5)
    assert cache.memory_bytes() == 2 * 5 * cache.pool.block_bytes
    cache.drop(s)
    assert cache.pool.used_blocks == 0
