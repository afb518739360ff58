"""Fuzzing in the test suite (bounded here; ``pytest tests/test_fuzz.py --long`` for the long
runs): a state machine over the public cache API with threads and snapshots, and a byte
mutation fuzzer of the snapshot loader."""
import hashlib
import pathlib
import random
import tempfile
import threading

import pytest
import torch
from hypothesis import settings, strategies as st
from hypothesis.stateful import precondition, rule, run_state_machine_as_test

import kvloom
from kvloom import reference as ref, snapshot
from test_cache import BS, D, H, L, CacheMachine, check_consistent


class CacheWithSnapshotsAndThreads(CacheMachine):
    """The cache machine (add, fork, drop, append, concurrent appends, evict, rollback) plus
    snapshots, attention checked against the reference, and misuse from two threads."""

    tmpdir = None

    def __init__(self):
        super().__init__()
        # room enough that no append meets a full pool: which of several racing appends would
        # get the last blocks is up to the threads, and hypothesis must be able to replay a run
        self.pool = kvloom.BlockPool("float32", D, BS, capacity_blocks=50_000, chunk_blocks=256)
        self.cache = kvloom.KVCache(L, H, D, pool=self.pool)

    @precondition(lambda self: 0 < len(self.model.seqs) < 12)
    @rule(data=st.data())
    def save_and_restore(self, data):
        seqs = data.draw(st.lists(st.sampled_from(sorted(self.model.seqs)), min_size=1, unique=True))
        path = self.tmpdir / "m.kvs"
        self.cache.save(path, seqs)
        try:
            new = self.cache.restore(path)
        except kvloom.CapacityError:
            return  # nothing was taken: the invariant checks it
        for s, n in zip(seqs, new):
            assert self.model.fork(s) == n  # a restored sequence is a copy with a fresh id

    @rule()
    def save_and_load(self):
        path = self.tmpdir / "all.kvs"
        self.cache.save(path)
        back = kvloom.KVCache.load(path)
        check_consistent(back, self.model)

    @precondition(lambda self: self.model.seqs)
    @rule(data=st.data())
    def damaged_snapshot_is_refused(self, data):
        path = self.tmpdir / "bad.kvs"
        self.cache.save(path)
        raw = bytearray(path.read_bytes())
        at = data.draw(st.integers(0, 1 << 20)) % len(raw)
        raw[at] ^= 1 << data.draw(st.integers(0, 7))
        path.write_bytes(bytes(raw))
        with pytest.raises(kvloom.SnapshotError):
            self.cache.restore(path)

    @precondition(lambda self: self.model.seqs)
    @rule(data=st.data(), layer=st.integers(0, L - 1))
    def attend_matches_reference(self, data, layer):
        s = data.draw(st.sampled_from(sorted(self.model.seqs)))
        q = torch.randn(1, 2 * H, D)
        out = self.cache.attend(layer, q, [s])
        for h in range(H):
            k, v, _, _ = self.model.contents(layer, h, s)
            want = torch.zeros(2, D) if k is None else ref.decode_attention(q[:, 2 * h:2 * h + 2], k[None, None],
                                                                              v[None, None])[0].float()
            torch.testing.assert_close(out[0, 2 * h:2 * h + 2], want, atol=2e-5, rtol=1e-4)

    @precondition(lambda self: self.model.seqs)
    @rule(data=st.data(), layer=st.integers(0, L - 1))
    def append_while_another_thread_reads(self, data, layer):
        """Misuse: a write and reads of one sequence at once. Each side either works or raises
        ConcurrencyError having done nothing; the model follows what returned."""
        s = data.draw(st.sampled_from(sorted(self.model.seqs)))
        k, v = self._tokens(3)
        go = threading.Barrier(2)
        result = {}

        def reader():
            go.wait()
            for _ in range(5):
                try:
                    self.cache.attend(layer, torch.randn(1, 2 * H, D), [s])
                except kvloom.ConcurrencyError:
                    pass

        t = threading.Thread(target=reader)
        t.start()
        go.wait()
        try:
            self.cache.append(layer, s, k, v)
            result["ok"] = True
        except kvloom.ConcurrencyError:
            result["ok"] = False  # it did nothing: retried below, alone
        except kvloom.CapacityError:
            result["ok"] = None
        t.join()
        if result["ok"] is False:  # (the state must not depend on the race, or hypothesis cannot replay)
            check_consistent(self.cache, self.model)
            try:
                self.cache.append(layer, s, k, v)
                result["ok"] = True
            except kvloom.CapacityError:
                pass
        if result["ok"]:
            self.model.append(layer, s, k, v, None)


def test_state_machine(tmp_path, long_run):
    CacheWithSnapshotsAndThreads.tmpdir = tmp_path
    run_state_machine_as_test(CacheWithSnapshotsAndThreads, settings=settings(
        max_examples=2000 if long_run else 30, stateful_step_count=40 if long_run else 25, deadline=None))


# --- byte mutations of snapshots ----------------------------------------------------------------
def sample_snapshot() -> bytes:
    torch.manual_seed(0)
    cache = kvloom.KVCache(2, 2, 8, dtype=torch.float16, block_size=4, policy=kvloom.Window(1, 6))
    a = cache.add_sequence()
    for layer in range(2):
        cache.append(layer, a, torch.randn(2, 9, 8), torch.randn(2, 9, 8), classes=torch.arange(9) % 3)
    b = cache.fork(a)
    cache.append(0, b, torch.randn(2, 2, 8), torch.randn(2, 2, 8))
    cache.apply_policy(0, a)
    meta = {**cache._snapshot_meta(), "sequences": [a, b]}
    blob = cache._c.export_sequences([a, b])
    with tempfile.TemporaryDirectory() as d:
        p = pathlib.Path(d) / "s.kvs"
        snapshot.write(p, "kvcache", meta, {"kv": blob})
        return p.read_bytes()


def reseal(data: bytearray) -> bytes:
    """The mutated bytes with a valid checksum, so the parsers behind it are exercised."""
    return bytes(data[:-32]) + hashlib.sha256(bytes(data[:-32])).digest()


def state(cache):
    return [(s, [cache.gather(layer, h, s) for layer in range(cache.n_layers) for h in range(cache.n_kv_heads)])
            for s in cache.sequences()]


def same_state(a, b):
    """Bit for bit (a mutated value may be NaN)."""
    def bits(t):
        return t.contiguous().view(torch.uint8).numpy().tobytes()

    return len(a) == len(b) and all(
        sa == sb and all(all(bits(x) == bits(y) for x, y in zip(ga, gb)) for ga, gb in zip(ha, hb))
        for (sa, ha), (sb, hb) in zip(a, b))


def fuzz(n: int, seed: int = 0) -> dict:
    """n mutated snapshots (half raw: the checksum must catch them; half resealed: the header
    and C++ parsers must). Each must load identically or fail with SnapshotError/CapacityError."""
    good = sample_snapshot()
    want = state(kvloom.KVCache._from_parsed(*snapshot.parse(good, "kvcache"), "good"))
    rng = random.Random(seed)
    counts = {"mutated": 0, "refused": 0, "identical": 0, "other_valid": 0}
    for i in range(n):
        m = bytearray(good)
        for _ in range(rng.choice([1, 1, 2, 3, 8])):
            kind = rng.random()
            at = rng.randrange(len(m))
            if kind < 0.6:
                m[at] ^= 1 << rng.randrange(8)
            elif kind < 0.8:
                m[at] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
            elif kind < 0.9:
                del m[at:at + rng.randint(1, 16)]
            else:
                m[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        resealed = i % 2 == 1
        data = reseal(m) if resealed and len(m) > 32 else bytes(m)
        counts["mutated"] += 1
        try:
            cache = kvloom.KVCache._from_parsed(*snapshot.parse(data, "kvcache"), "fuzz", capacity_bytes=1 << 20)
        except (kvloom.SnapshotError, kvloom.CapacityError):
            counts["refused"] += 1
            continue
        got = state(cache)
        if same_state(got, want):
            counts["identical"] += 1
        else:
            # a resealed mutation of block data or of a free field: a valid snapshot of other
            # contents; it must round-trip like any cache
            assert resealed, "a raw mutation got past the checksum"
            counts["other_valid"] += 1
            again = cache._c.export_sequences(cache.sequences())
            fresh = kvloom.KVCache(cache.n_layers, cache.n_kv_heads, cache.head_dim, dtype=cache.dtype,
                                   block_size=cache.block_size)
            fresh._c.import_sequences(again, True)
            assert same_state(state(fresh), got)
            if cache.sequences():
                cache.attend(0, torch.randn(len(cache.sequences()), 4, 8), cache.sequences())
    return counts


def test_snapshot_mutation_fuzz(long_run):
    n = 100_000 if long_run else 3_000
    counts = fuzz(n)
    print(counts)
    assert counts["mutated"] == n and counts["refused"] + counts["identical"] + counts["other_valid"] == n
    assert counts["refused"] > n // 2
