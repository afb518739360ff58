"""Snapshots: a saved cache continues exactly (attention, greedy tokens, every policy, after
forks); files that are truncated, corrupted, of another version, kind or model are refused
with kvloom.SnapshotError and change nothing; a save killed at any point leaves the previous
snapshot loadable."""
import os
import random
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch

import kvloom
from kvloom import snapshot
from policy_suite import _Tok

POLICIES = ["full", "window", "h2o", "fastgen", "taskkv", "nats"]


def observe(cache, seq):
    """Everything observable about one sequence of a KVCache."""
    out = [cache.seq_length(seq)]
    for layer in range(cache.n_layers):
        for h in range(cache.n_kv_heads):
            k, v, ords, pos = cache.gather(layer, h, seq)
            out += [k.tolist(), v.tolist(), ords.tolist(), pos.tolist(), cache.slots(layer, h, seq)[0].tolist(),
                    cache.classes(layer, h, seq).tolist(), cache.scores(layer, h, seq).tolist(),
                    cache._c.plan_name(layer, h, seq)]
    return out


def busy_cache(dtype=torch.float16):
    cache = kvloom.KVCache(3, 2, 16, dtype=dtype, block_size=4, policy=kvloom.HeavyHitter(0.3, 3),
                           layer_store=[0, 0, 2])  # layer 1 reads layer 0's KV (CLA)
    cache.set_layer_window(2, 6)
    a = cache.add_sequence()
    for layer in (0, 2):
        cache.append(layer, a, torch.randn(2, 13, 16), torch.randn(2, 13, 16), positions=torch.arange(13) * 2,
                     classes=torch.arange(13) % 3)
        cache.accumulate_attention(layer, torch.randn(1, 4, 13, 16), [a])
        cache.apply_policy(layer, a)
    b = cache.fork(a)
    cache.append(0, b, torch.randn(2, 3, 16), torch.randn(2, 3, 16))
    cache.evict(0, 1, a, [int(cache.slots(0, 1, a)[0][0])])
    cache.set_head_plan(2, 1, b, kvloom._core.make_plan("window", {"sinks": 1, "recent": 2}))
    cache.drop(cache.add_sequence())  # an id gap
    return cache, [a, b]


def test_kvcache_round_trip_is_exact(tmp_path):
    cache, seqs = busy_cache()
    path = tmp_path / "c.kvs"
    size = cache.save(path)
    assert size == path.stat().st_size
    back = kvloom.KVCache.load(path)
    assert back.sequences() == seqs and back.layer_store == [0, 0, 2] and back.dtype == torch.float16
    assert back.policy_name == cache.policy_name
    for s in seqs:
        assert observe(back, s) == observe(cache, s)
    assert back.memory_bytes() == cache.memory_bytes()  # the fork still shares its blocks
    q = torch.randn(2, 4, 16)
    for layer in range(3):
        assert torch.equal(back.attend(layer, q, seqs), cache.attend(layer, q, seqs))
    # both continue alike: the same appends, statistics and plans give the same caches
    for c in (cache, back):
        torch.manual_seed(1)
        for layer in (0, 2):
            c.append(layer, seqs[1], torch.randn(2, 5, 16), torch.randn(2, 5, 16))
            c.accumulate_attention(layer, torch.randn(1, 4, 5, 16), [seqs[1]])
            c.apply_policy(layer, seqs[1])
    assert observe(back, seqs[1]) == observe(cache, seqs[1])
    # restore into a live cache: fresh ids, same contents
    new = cache.restore(path)
    assert new == [3, 4] and observe(cache, new[0]) == observe(back, seqs[0])


def test_saved_subset_and_empty(tmp_path):
    cache, seqs = busy_cache(torch.float32)
    cache.save(tmp_path / "one.kvs", seqs=[seqs[1]])
    back = kvloom.KVCache.load(tmp_path / "one.kvs")
    assert back.sequences() == [seqs[1]] and observe(back, seqs[1]) == observe(cache, seqs[1])
    kvloom.KVCache(1, 1, 8).save(tmp_path / "empty.kvs")
    assert kvloom.KVCache.load(tmp_path / "empty.kvs").sequences() == []


def damaged(data: bytes):
    """(name, bytes) of ways a file goes bad."""
    yield "empty", b""
    yield "truncated header", data[:20]
    for cut in (len(data) // 3, len(data) // 2, len(data) - 33, len(data) - 1):
        yield f"cut at {cut}", data[:cut]
    for at in (3, 30, len(data) // 2, len(data) - 40, len(data) - 5):
        b = bytearray(data)
        b[at] ^= 0x10
        yield f"bit flip at {at}", bytes(b)
    b = bytearray(data)
    struct.pack_into("<I", b, len(snapshot.MAGIC), 2)
    yield "future version", bytes(b)
    yield "appended junk", data + b"x"


def test_damaged_files_are_refused_and_change_nothing(tmp_path):
    cache, seqs = busy_cache()
    good = tmp_path / "good.kvs"
    cache.save(good)
    data = good.read_bytes()
    before = [observe(cache, s) for s in cache.sequences()]
    used = cache.pool.used_blocks
    for name, bad in damaged(data):
        p = tmp_path / "bad.kvs"
        p.write_bytes(bad)
        with pytest.raises(kvloom.SnapshotError) as e:
            kvloom.KVCache.load(p)
        if name == "future version":
            assert "newer kvloom" in str(e.value)
        with pytest.raises(kvloom.SnapshotError):
            cache.restore(p)
        assert [observe(cache, s) for s in cache.sequences()] == before and cache.pool.used_blocks == used, name
    with pytest.raises(FileNotFoundError):
        kvloom.KVCache.load(tmp_path / "missing.kvs")


def test_other_geometry_and_kind_are_refused(tmp_path):
    cache, _ = busy_cache()
    cache.save(tmp_path / "c.kvs")
    other = kvloom.KVCache(3, 2, 16, dtype=torch.float32, block_size=4, layer_store=[0, 0, 2])
    with pytest.raises(kvloom.SnapshotError, match="dtype"):
        other.restore(tmp_path / "c.kvs")
    assert other.sequences() == []
    with pytest.raises(kvloom.SnapshotError, match="layer sharing"):
        kvloom.KVCache(3, 2, 16, dtype=torch.float16, block_size=4).restore(tmp_path / "c.kvs")
    snapshot.write(tmp_path / "x.kvs", "conversation", {}, {})
    with pytest.raises(kvloom.SnapshotError, match="not a 'kvcache'"):
        kvloom.KVCache.load(tmp_path / "x.kvs")


def test_capacity_error_on_load_takes_nothing(tmp_path):
    cache, _ = busy_cache()
    cache.save(tmp_path / "c.kvs")
    pool = kvloom.BlockPool("float16", 16, 4, capacity_blocks=3)
    with pytest.raises(kvloom.CapacityError):
        kvloom.KVCache.load(tmp_path / "c.kvs", pool=pool)
    assert pool.used_blocks == 0


def test_in_memory_nats_scorer_cannot_be_saved(tmp_path):
    sc = kvloom.nats.Scorer(2, 8, 1, window=4)
    cache = kvloom.KVCache(2, 1, 8, policy=kvloom.NAtS(scorer=sc))
    with pytest.raises(ValueError, match="Scorer.save"):
        cache.save(tmp_path / "n.kvs")
    assert not (tmp_path / "n.kvs").exists() and not list(tmp_path.iterdir())  # no temporary left behind


# --- the transformers cache: greedy continuation, every policy, forks ---------------------------
def policy_for(name, model, tmp_path):
    pol = kvloom.policies.get(name).example(model)
    if name == "nats":  # a saved scorer (snapshots record its path)
        pol.scorer.save(tmp_path / "scorer.pt")
        pol = kvloom.NAtS(scorer=str(tmp_path / "scorer.pt"), window=pol.window)
    return pol


def greedy(model, cache, ids, n):
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids, **kvloom.hf.compat.cache_kwargs(cache)).logits[:, -1]
            ids = logits.argmax(-1, keepdim=True)
            out.append(int(ids))
    return out, logits


@pytest.mark.hf
@pytest.mark.parametrize("name", POLICIES)
def test_loaded_cache_continues_token_for_token(name, tmp_path):
    from hf_helpers import tiny_model

    model = tiny_model("llama")
    kvloom.enable(model)
    pol = policy_for(name, model, tmp_path)
    kw = {"tokenizer": _Tok()} if pol.needs_tokenizer else {}
    cache = kvloom.Cache(model, pol, **kw)
    torch.manual_seed(0)
    prompt = torch.randint(0, 256, (1, 40))
    first, _ = greedy(model, cache, prompt, 6)
    cache.save(tmp_path / "c.kvs")
    fork = cache.fork()  # a fork saved on its own continues alike too
    more, _ = greedy(model, fork, torch.tensor([[first[-1]]]), 3)
    fork.save(tmp_path / "f.kvs")
    back = kvloom.Cache.load(tmp_path / "c.kvs", model, **kw)
    own = cache.stats()["sequences"]  # (the C++ cache also holds the fork's sequence)
    assert back.get_seq_length() == cache.get_seq_length()
    assert back.stats()["sequences"] == {s: own[s] for s in cache.seqs}
    a, la = greedy(model, cache, torch.tensor([[first[-1]]]), 12)
    b, lb = greedy(model, back, torch.tensor([[first[-1]]]), 12)
    assert a == b and torch.equal(la, lb)
    fork_back = kvloom.Cache.load(tmp_path / "f.kvs", model, **kw)
    x, _ = greedy(model, fork, torch.tensor([[more[-1]]]), 8)
    y, _ = greedy(model, fork_back, torch.tensor([[more[-1]]]), 8)
    assert x == y


@pytest.mark.hf
def test_other_model_is_refused(tmp_path):
    from hf_helpers import tiny_model

    a, b = tiny_model("llama"), tiny_model("llama")
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.01)  # same architecture, other weights
    for m in (a, b):
        kvloom.enable(m)
    cache = kvloom.Cache(a)
    greedy(a, cache, torch.randint(0, 256, (1, 10)), 2)
    cache.save(tmp_path / "c.kvs")
    with pytest.raises(kvloom.SnapshotError, match="another model.*weights"):
        kvloom.Cache.load(tmp_path / "c.kvs", b)
    with pytest.raises(kvloom.SnapshotError, match="another model"):
        q = tiny_model("qwen2")
        kvloom.enable(q)
        kvloom.Cache.load(tmp_path / "c.kvs", q)
    assert kvloom.Cache.load(tmp_path / "c.kvs", a).get_seq_length() == 11


@pytest.mark.hf
def test_conversation_round_trip(tmp_path):
    from hf_helpers import smollm2

    model, tok = smollm2()
    conv = kvloom.Conversation(model, tok, kvloom.Window(4, 64))
    conv.say("Name three colours.", max_new_tokens=6)
    conv.save(tmp_path / "conv.kvs")
    back = kvloom.Conversation.load(tmp_path / "conv.kvs", model, tok)
    assert back.messages == conv.messages and back.tokens == conv.tokens
    assert back.say("And three animals?", max_new_tokens=10) == conv.say("And three animals?", max_new_tokens=10)
    with pytest.raises(kvloom.SnapshotError, match="'conversation' snapshot, not a 'cache'"):
        kvloom.Cache.load(tmp_path / "conv.kvs", model)


# --- crash safety -------------------------------------------------------------------------------
SAVER = r"""
import sys, torch, kvloom
path, start, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cache = kvloom.KVCache(2, 2, 32, block_size=8)
s = cache.add_sequence()
for i in range(start + n):
    for layer in range(2):  # save i holds i + 1 appends of 40 tokens, every value i
        cache.append(layer, s, torch.full((2, 40, 32), float(i)), torch.full((2, 40, 32), float(i)))
    if i >= start:
        cache.save(path)
        print(i, flush=True)
"""


def test_sigkill_during_saves_never_leaves_a_broken_snapshot(tmp_path):
    """At least 200 saves, the saver killed with SIGKILL at random moments (mostly in the middle
    of a save: each writes a few MB and fsyncs) and restarted: the file is always the latest or
    the previous complete snapshot."""
    path = tmp_path / "c.kvs"
    rng = random.Random(5)
    done, kills = 0, 0
    while done < 200 or kills < 20:
        p = subprocess.Popen([sys.executable, "-c", SAVER, str(path), str(done), "100000"], stdout=subprocess.PIPE,
                             text=True)
        finished = [int(p.stdout.readline()) for _ in range(rng.randint(1, 12))]  # let a few saves land,
        time.sleep(rng.uniform(0.0, 0.03))  # then kill it at a random moment of the next ones
        p.send_signal(signal.SIGKILL)
        out, _ = p.communicate()
        finished += [int(x) for x in out.split()]
        kills += p.returncode == -signal.SIGKILL
        c = kvloom.KVCache.load(path)  # never fails: the latest complete save, or the one before
        i = int(c.gather(0, 0, 0)[0][-1, 0])
        assert c.seq_length(0) == 40 * (i + 1)
        assert finished[-1] <= i <= finished[-1] + 1  # printed after its rename; the next may be in too
        done = i + 1
    leftovers = [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert all(f.startswith(".c.kvs.") for f in leftovers)  # temporaries only, never the target
    print(f"{done} saves, {kills} kills, {len(leftovers)} of them in the middle of a save")
    assert leftovers, "no kill landed inside a save: the test did not test anything"


@pytest.mark.parametrize("name", ["v1_float", "v2_int4"])
def test_snapshots_of_the_older_formats_still_load(name):
    """Files written before the slot metadata skipped table holes (C++ versions 1 and 2, written
    by commit 320caa2: a Window's prompt evicted from the middle leaves holes) load into the same
    state, and save again smaller."""
    import json
    from pathlib import Path

    data = Path(__file__).parent / "data"
    want = json.loads((data / "snapshot_old_formats.json").read_text())[name]
    cache = kvloom.KVCache.load(data / f"snapshot_{name}.kvs")
    assert cache.sequences() == want["seqs"] and cache.memory_bytes() == want["memory_bytes"]
    for key, obs in want["observe"].items():
        s, layer, h = map(int, key.split("/"))
        k, v, ords, pos = cache.gather(layer, h, s)
        assert [k.tolist(), v.tolist(), ords.tolist(), pos.tolist(), cache.classes(layer, h, s).tolist()] == obs[:5]
        assert len(cache.block_table(layer, h, s)) == len(obs[5])  # (block ids are allocated anew)
    again = kvloom.KVCache.loads(cache.dumps())
    assert len(cache.dumps()) < (data / f"snapshot_{name}.kvs").stat().st_size  # no metadata for the holes
    for key in want["observe"]:
        s, layer, h = map(int, key.split("/"))
        for x, y in zip(cache.gather(layer, h, s), again.gather(layer, h, s)):
            assert torch.equal(x, y)
