"""Quantized storage inside the paged cache (issue 15, second stage): ``KVCache(kv_dtype=...)``.

A random program of cache operations (appends, evictions, the policy with its compaction,
forks, rollbacks, drops) runs on a quantized cache while a model of it in plain Python tracks
what every token must hold: the exact input while its block is in full precision, and, from the
moment its block is sealed, exactly ``kvloom.reference``'s quantize/dequantize of that block's
rows, never changing again (no re-quantization by moves, forks or rollbacks). After every step
the attention kernels over the cache equal reference attention over its (dequantized) contents,
and ``memory_bytes()`` counts each pool's blocks at their own size."""
import pytest
import torch
from hypothesis import given, strategies as st

import kvloom
from kvloom import reference as ref
from conftest import TOL
from test_chunk_attention import reference as chunk_reference

BITS = {"int8": 8, "int4": 4, "int2": 2}


class Model:
    """What each (sequence, head, ord) must hold."""

    def __init__(self, cache, bits):
        self.c, self.bits = cache, bits
        self.inputs = {}  # seq -> {(head, ord): (k, v)}
        self.sealed = {}  # seq -> {(head, ord): (k, v)} dequantized values, fixed once sealed
        self.seen = {}    # seq -> {(head, sealed block id): ords it held when first seen}

    def add(self, s):
        self.inputs[s], self.sealed[s], self.seen[s] = {}, {}, {}

    def fork(self, src, dst):
        self.inputs[dst] = dict(self.inputs[src])
        self.sealed[dst] = dict(self.sealed[src])
        self.seen[dst] = dict(self.seen[src])

    def drop(self, s):
        for d in (self.inputs, self.sealed, self.seen):
            d.pop(s)

    def appended(self, s, k, v, first):
        for h in range(k.shape[0]):
            for j in range(k.shape[1]):
                self.inputs[s][(h, first + j)] = (k[h, j].clone(), v[h, j].clone())

    def rolled_back(self, s, keep):
        for d in (self.inputs[s], self.sealed[s]):
            for key in [key for key in d if key[1] >= keep]:
                del d[key]
        self.seen[s] = {b: {o for o in ords if o < keep} for b, ords in self.seen[s].items()}

    def check(self, s):
        c, bs = self.c, self.c.block_size
        for h in range(c.n_kv_heads):
            table, sealed = c.block_table(0, h, s), c.sealed_blocks(0, h, s)
            assert len(table) == len(sealed)
            slots, ords, _ = c.slots(0, h, s)
            k, v, g_ords, _ = c.gather(0, h, s)
            row = {int(o): i for i, o in enumerate(g_ords.tolist())}
            held = {(h, b) for b, x in zip(table, sealed) if x}
            for key in [key for key in self.seen[s] if key[0] == h and key not in held]:
                del self.seen[s][key]  # released: its id may come back for other tokens
            by_entry = {}
            for sl, o in zip(slots.tolist(), ords.tolist()):
                by_entry.setdefault(sl // bs, []).append((sl % bs, o))
            for e, rows in by_entry.items():
                # a sealed block only loses tokens; other ords under a known id: the id was reused
                known = self.seen[s].get((h, table[e]))
                if sealed[e] and (known is None or not {o for _, o in rows} <= known):
                    # sealed since the last check: all bs rows were live when it was quantized
                    assert len(rows) == bs, "a block was sealed with dead slots"
                    rows.sort()
                    kin = torch.stack([self.inputs[s][(h, o)][0] for _, o in rows])
                    vin = torch.stack([self.inputs[s][(h, o)][1] for _, o in rows])
                    blk = ref.quantize_block(kin, vin, self.bits, bs)
                    kq, vq = ref.dequantize_block(blk, self.bits, bs, c.head_dim, bs)
                    for (_, o), kk, vv in zip(rows, kq, vq):
                        assert (h, o) not in self.sealed[s], "a token was quantized twice"
                        self.sealed[s][(h, o)] = (kk, vv)
                    self.seen[s][(h, table[e])] = {o for _, o in rows}
                for _, o in rows:
                    got = (k[row[o]], v[row[o]])
                    if sealed[e]:
                        want = self.sealed[s][(h, o)]
                    else:
                        assert (h, o) not in self.sealed[s], "a sealed token went back to full precision"
                        want = self.inputs[s][(h, o)]
                    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"head {h} ord {o}"

    def check_memory(self):
        c = self.c
        fp, q = set(), set()
        for s in c.sequences():
            for h in range(c.n_kv_heads):
                for b, sealed in zip(c.block_table(0, h, s), c.sealed_blocks(0, h, s)):
                    if b >= 0:
                        (q if sealed else fp).add(b)
        assert c.memory_bytes() == len(fp) * c.pool.block_bytes + len(q) * c.sealed_pool.block_bytes


def attention_matches(c, s, g, Hq):
    q = torch.randn(1, Hq, c.head_dim, generator=g)
    got = c.attend(0, q, [s])
    G = Hq // c.n_kv_heads
    for h in range(c.n_kv_heads):  # heads hold different tokens
        k, v = c.gather(0, h, s)[:2]
        if len(k) == 0:
            continue
        want = ref.decode_attention(q[:, h * G:(h + 1) * G], k[None, None], v[None, None])
        torch.testing.assert_close(got[:, h * G:(h + 1) * G].double(), want, **TOL[torch.float32])


POLICIES = {"full": lambda: kvloom.Full(), "window": lambda: kvloom.Window(sinks=2, recent=11),
            "h2o": lambda: kvloom.HeavyHitter(ratio=0.3, recent=5)}


@given(kv=st.sampled_from(list(BITS)), heads=st.sampled_from([(3, 1), (6, 2), (4, 4)]), D=st.sampled_from([8, 16, 64]),
       bs=st.sampled_from([4, 8]), policy=st.sampled_from(list(POLICIES)), seed=st.integers(0, 2**31 - 1),
       ops=st.lists(st.sampled_from(["append", "append", "step", "evict", "policy", "fork", "rollback", "drop_parent"]),
                    min_size=4, max_size=18))
def test_cache_operations_keep_quantized_contents_exact(isa, kv, heads, D, bs, policy, seed, ops):
    Hq, Hkv = heads
    g = torch.Generator().manual_seed(seed)
    c = kvloom.KVCache(1, Hkv, D, kv_dtype=kv, block_size=bs, policy=POLICIES[policy](), capacity_bytes=1 << 22)
    m = Model(c, BITS[kv])
    s = c.add_sequence()
    m.add(s)
    parent = None  # the sequence s was forked from (while it lives)

    def append(n):
        k, v = torch.randn(Hkv, n, D, generator=g) * 3, torch.randn(Hkv, n, D, generator=g)
        first = c.seq_length(s)
        c.append(0, s, k, v)
        m.appended(s, k, v, first)
        return n

    for op in ops:
        if op == "append":
            n = append(int(torch.randint(1, 3 * bs, (1,), generator=g)))
            if c.seq_length(s) >= n:  # chunk attention of the new tokens over everything before
                q = torch.randn(1, Hq, n, D, generator=g)
                got = c.chunk_attention(0, q, [s], scale=D ** -0.5)
                torch.testing.assert_close(got.double(), chunk_reference(c, 0, q, [s], None, D ** -0.5),
                                           **TOL[torch.float32])
        elif op == "step":  # a decode step as the HF adapter runs it
            append(1)
            m.check(s)  # (the append sealed what it did not write; the policy may evict from it next)
            q = torch.randn(1, Hq, 1, D, generator=g)
            if policy == "h2o":
                c.accumulate_attention(0, q, [s])
            c.apply_policy(0, s)
        elif op == "evict":
            for h in range(Hkv):
                slots = c.slots(0, h, s)[0]
                drop = [int(x) for x in slots if torch.rand(1, generator=g).item() < 0.3]
                c.evict(0, h, s, drop)
        elif op == "policy":
            c.apply_policy(0, s)
        elif op == "fork":
            if parent is not None:
                c.drop(parent)
                m.drop(parent)
            parent, s = s, c.fork(s)
            m.fork(parent, s)
        elif op == "rollback":
            n = int(torch.randint(0, c.seq_length(s) + 1, (1,), generator=g))
            c.rollback(s, n)
            m.rolled_back(s, c.seq_length(s))
        elif op == "drop_parent" and parent is not None:
            c.drop(parent)
            m.drop(parent)
            parent = None
        for seq in [s] + ([parent] if parent is not None else []):
            m.check(seq)
        m.check_memory()
        if c.seq_length(s) > 0 and any(c.lengths(s)[0]):
            attention_matches(c, s, g, Hq)
    c.drop(s)
    if parent is not None:
        c.drop(parent)
    assert c.memory_bytes() == 0 and c.pool.used_blocks == 0 and c.sealed_pool.used_blocks == 0


@given(kv=st.sampled_from(list(BITS)), D=st.sampled_from([16, 64]), n=st.integers(9, 60), tq=st.integers(1, 8),
       seed=st.integers(0, 2**31 - 1))
def test_accumulated_attention_over_sealed_blocks(isa, kv, D, n, tq, seed):
    g = torch.Generator().manual_seed(seed)
    if kv == "int2":
        n = max(n, 24)  # int2 keeps the first block and the newest full one in full precision
    c = kvloom.KVCache(1, 2, D, kv_dtype=kv, block_size=8)
    s = c.add_sequence()
    c.append(0, s, torch.randn(2, n, D, generator=g), torch.randn(2, n, D, generator=g))
    c.append(0, s, torch.randn(2, tq, D, generator=g), torch.randn(2, tq, D, generator=g))  # seals the first
    assert any(c.sealed_blocks(0, 0, s))
    q = torch.randn(1, 6, tq, D, generator=g)
    c.accumulate_attention(0, q, [s])
    for h in range(2):
        k, _, ords, _ = c.gather(0, h, s)
        want = ref.accumulated_attention(q[0, 3 * h:3 * h + 3], k, ords.tolist(), n + tq)
        got = dict(zip(c.slots(0, h, s)[1].tolist(), c.scores(0, h, s).tolist()))
        got = torch.tensor([got[o] for o in ords.tolist()], dtype=torch.float64)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_segments_and_layer_sharing_read_sealed_blocks():
    g = torch.Generator().manual_seed(1)
    c = kvloom.KVCache(2, 2, 16, kv_dtype="int4", block_size=4, layer_store=[0, 0])
    a, b = c.add_sequence(), c.add_sequence()
    for s, n in ((a, 13), (b, 9)):
        c.append(0, s, torch.randn(2, n, 16, generator=g), torch.randn(2, n, 16, generator=g))
        c.append(0, s, torch.randn(2, 1, 16, generator=g), torch.randn(2, 1, 16, generator=g))
    assert all(any(c.sealed_blocks(0, h, s)) for s in (a, b) for h in range(2))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    q = torch.randn(1, 4, 16, generator=g)
    got = c.attend(1, q, [[(a, 0), (b, 5)]], inv_freq=inv_freq)  # layer 1 reads layer 0 (CLA)
    segs = []
    for s, delta in ((a, 0), (b, 5)):
        k = torch.stack([c.gather(0, h, s)[0] for h in range(2)])[None]
        v = torch.stack([c.gather(0, h, s)[1] for h in range(2)])[None]
        segs.append((k, v, [delta]))
    torch.testing.assert_close(got.double(), ref.segment_attention(q, segs, inv_freq), **TOL[torch.float32])


def test_quantized_memory_and_full_pool():
    g = torch.Generator().manual_seed(2)
    full = kvloom.KVCache(1, 3, 64, block_size=32)
    q4 = kvloom.KVCache(1, 3, 64, kv_dtype="int4")
    for c in (full, q4):
        s = c.add_sequence()
        c.append(0, s, torch.randn(3, 1024, 64, generator=g), torch.randn(3, 1024, 64, generator=g))
        c.append(0, s, torch.randn(3, 1, 64, generator=g), torch.randn(3, 1, 64, generator=g))
    # 32 sealed blocks of 2560 bytes (scales included) and one open fp32 block per head
    assert q4.memory_bytes() == 3 * (32 * ref.quant_block_bytes(4, 32, 64) + 2 * 32 * 64 * 4)
    assert q4.memory_bytes() < 0.2 * full.memory_bytes()
    assert q4.kv_dtype == "int4" and q4.stats()["kv_dtype"] == "int4"
    # a full quantized pool is no error: blocks stay in full precision
    tiny = kvloom.KVCache(1, 1, 16, kv_dtype="int8", block_size=4)
    tiny._qpool = kvloom.BlockPool("float32", 16, 4, 3, 0, "cpu", 0, 8)  # room for 3 sealed blocks
    tiny._c.set_quantized(tiny._qpool)
    s = tiny.add_sequence()
    x = torch.randn(1, 40, 16, generator=g)
    tiny.append(0, s, x, x)
    tiny.append(0, s, x[:, :1], x[:, :1])
    sealed = tiny.sealed_blocks(0, 0, s)
    assert sum(sealed) == 3 and len(sealed) == 11
    assert torch.equal(tiny.gather(0, 0, s)[0][-5:], torch.cat([x[0, -4:], x[0, :1]]))


def test_quantized_cache_bad_input_changes_nothing():
    c = kvloom.KVCache(1, 2, 16, kv_dtype="int4", block_size=4)
    s = c.add_sequence()
    c.append(0, s, torch.randn(2, 9, 16), torch.randn(2, 9, 16))
    c.append(0, s, torch.randn(2, 1, 16), torch.randn(2, 1, 16))
    before = [c.gather(0, h, s) for h in range(2)], c.memory_bytes(), c.sealed_blocks(0, 0, s)
    for bad in (float("nan"), float("inf"), 70000.0):
        k = torch.randn(2, 5, 16)
        k[1, 3, 7] = bad
        with pytest.raises(ValueError, match="fp16's range"):
            c.append(0, s, k, torch.randn(2, 5, 16))
    after = [c.gather(0, h, s) for h in range(2)], c.memory_bytes(), c.sealed_blocks(0, 0, s)
    assert all(torch.equal(x, y) for a, b in zip(before[0], after[0]) for x, y in zip(a, b))
    assert before[1:] == after[1:] and c.seq_length(s) == 10
    with pytest.raises(ValueError, match="kv_dtype must be one of"):
        kvloom.KVCache(1, 2, 16, kv_dtype="int3")
    with pytest.raises(ValueError, match="multiple of 8"):
        kvloom.KVCache(1, 2, 12, kv_dtype="int8")
    with pytest.raises(ValueError, match="leave pool= out"):
        kvloom.KVCache(1, 2, 16, kv_dtype="int8", pool=c.pool)


@pytest.mark.parametrize("kv_dtype", ["int4", "int2"])
def test_quantized_snapshot_round_trip(tmp_path, kv_dtype):
    """Snapshots carry sealed blocks as they are: a loaded cache holds every token bit for bit,
    the same sealed blocks and bytes, and goes on sealing as the original does."""
    g = torch.Generator().manual_seed(3)
    c = kvloom.KVCache(2, 2, 16, kv_dtype=kv_dtype, block_size=4, policy=kvloom.Window(sinks=1, recent=9))
    a = c.add_sequence()
    for n in (11, 1, 6, 1):
        for layer in range(2):
            c.append(layer, a, torch.randn(2, n, 16, generator=g), torch.randn(2, n, 16, generator=g))
            c.apply_policy(layer, a)
    b = c.fork(a)
    for layer in range(2):
        c.append(layer, b, torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g))
    c.save(tmp_path / "q.kvloom")
    d = kvloom.KVCache.load(tmp_path / "q.kvloom")
    assert d.kv_dtype == kv_dtype and d.sequences() == [a, b] and d.memory_bytes() == c.memory_bytes()
    for s in (a, b):
        for layer in range(2):
            for h in range(2):
                assert d.sealed_blocks(layer, h, s) == c.sealed_blocks(layer, h, s)
                for x, y in zip(c.gather(layer, h, s), d.gather(layer, h, s)):
                    assert torch.equal(x, y)
    k, v = torch.randn(2, 4, 16, generator=g), torch.randn(2, 4, 16, generator=g)
    for cache in (c, d):
        for layer in range(2):
            cache.append(layer, a, k, v)
            cache.apply_policy(layer, a)
    assert all(torch.equal(x, y) for x, y in zip(c.gather(1, 1, a), d.gather(1, 1, a)))
    plain = kvloom.KVCache(2, 2, 16, block_size=4, policy=kvloom.Window(sinks=1, recent=9))
    with pytest.raises(kvloom.SnapshotError, match="no quantized storage"):
        plain.restore(tmp_path / "q.kvloom")
    assert plain.memory_bytes() == 0


@pytest.mark.parametrize("kv_dtype", ["int8", "int4", "int2"])
def test_kv_sections_of_version_4(kv_dtype):
    """KV sections of version 4 (before the 2-bit layout changed) still load with 8 and 4 bits,
    the same blocks, and are refused with 2 bits, naming why, with the cache unchanged."""
    g = torch.Generator().manual_seed(5)
    c = kvloom.KVCache(1, 2, 32, kv_dtype=kv_dtype, block_size=4)
    s = c.add_sequence()
    c.append(0, s, torch.randn(2, 13, 32, generator=g), torch.randn(2, 13, 32, generator=g))
    c.apply_policy(0, s)
    blob = bytearray(c._c.export_sequences([s]))
    assert blob[:8] == b"KVLSNAP1" and int.from_bytes(blob[8:12], "little") == 5
    blob[8:12] = (4).to_bytes(4, "little")
    d = kvloom.KVCache(1, 2, 32, kv_dtype=kv_dtype, block_size=4)
    if kv_dtype == "int2":
        with pytest.raises(ValueError, match="first 2-bit layout"):
            d._c.import_sequences(bytes(blob), True)
        assert d.sequences() == [] and d.memory_bytes() == 0
        return
    d._c.import_sequences(bytes(blob), True)
    for h in range(2):
        assert d.sealed_blocks(0, h, s) == c.sealed_blocks(0, h, s)
        assert all(torch.equal(x, y) for x, y in zip(c.gather(0, h, s), d.gather(0, h, s)))


def test_two_bit_keeps_the_first_and_the_newest_full_block():
    """int2 (kvloom/quant.h): each head's first block (the sinks) and the full block holding its
    newest token stay in full precision; every other full block is sealed; bytes count that."""
    g = torch.Generator().manual_seed(6)
    c = kvloom.KVCache(1, 2, 16, kv_dtype="int2", block_size=4)
    s = c.add_sequence()
    for n, want in ((3, []), (1, []), (4, []), (4, [1]), (1, [1]), (7, [1, 2, 3]), (1, [1, 2, 3]), (3, [1, 2, 3, 4])):
        c.append(0, s, torch.randn(2, n, 16, generator=g), torch.randn(2, n, 16, generator=g))
        c.apply_policy(0, s)
        for h in range(2):
            assert [e for e, x in enumerate(c.sealed_blocks(0, h, s)) if x] == want, (n, h)
        n_blocks = len(c.block_table(0, 0, s))
        assert c.memory_bytes() == 2 * (len(want) * c.sealed_pool.block_bytes + (n_blocks - len(want)) * c.pool.block_bytes)
    assert kvloom.KVCache(1, 2, 16, kv_dtype="int2").pool.block_size == 16
    assert kvloom.KVCache(1, 2, 16, kv_dtype="int4").pool.block_size == 32


def test_transformers_cache_snapshot_with_quantized_storage(tmp_path):
    from policy_suite import tiny_llama
    from test_snapshot import greedy

    model = tiny_llama()
    cache = kvloom.Cache(model, kv_dtype="int8", block_size=4)
    first, _ = greedy(model, cache, torch.randint(4, 128, (1, 30), generator=torch.Generator().manual_seed(4)), 6)
    cache.save(tmp_path / "c.kvloom")
    back = kvloom.Cache.load(tmp_path / "c.kvloom", model)
    assert back.kv.kv_dtype == "int8" and back.memory_bytes() == cache.memory_bytes()
    a, la = greedy(model, cache, torch.tensor([[first[-1]]]), 9)
    b, lb = greedy(model, back, torch.tensor([[first[-1]]]), 9)
    assert a == b and torch.equal(la, lb)
