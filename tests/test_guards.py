"""Misuse gets a clear exception, never a crash or a silent wrong answer: concurrent use of
one sequence (guarded in C++), and inputs kvloom used to accept silently."""
import json
import os
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch

import kvloom
from test_errors import snapshot, same

HERE = os.path.dirname(__file__)


def small_cache(**kw):
    cache = kvloom.KVCache(2, 2, 16, block_size=4, **kw)
    s = cache.add_sequence()
    cache.append(0, s, torch.randn(2, 6, 16), torch.randn(2, 6, 16))
    return cache, s


# --- concurrency ------------------------------------------------------------------------------
def test_misuse_patterns_raise_and_never_crash():
    """Each pattern 100 times in a child process (a crash would kill it, not the test run)."""
    r = subprocess.run([sys.executable, os.path.join(HERE, "misuse.py"), "--runs", "100"], capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, f"rc {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    rows = {d["pattern"]: d for d in map(json.loads, r.stdout.splitlines())}
    assert len(rows) == 7 and all(d["runs"] == 100 for d in rows.values())
    # the patterns where both sides write or read/write with the GIL released do collide, and
    # each collision was a ConcurrencyError (misuse.py re-raises anything else)
    for name in ("append_append", "append_attend", "policy_attend", "evict_gather"):
        assert rows[name]["concurrency_errors"] > 0, rows[name]


def test_concurrency_error_names_both_operations_and_changes_nothing():
    cache, s = small_cache()
    layer0 = cache.gather(0, 0, s)[0].clone()
    stop = threading.Event()
    seen, appended = [], 0

    def reader():
        q = torch.randn(1, 4, 16)
        while not stop.is_set():
            try:
                cache.attend(0, q, [s])
            except kvloom.ConcurrencyError:
                pass

    t = threading.Thread(target=reader)
    t.start()
    try:
        for _ in range(20000):
            try:
                cache.append(1, s, torch.randn(2, 1, 16), torch.randn(2, 1, 16))
                appended += 1
            except kvloom.ConcurrencyError as e:
                seen.append(str(e))
                if len(seen) > 3:
                    break
    finally:
        stop.set()
        t.join()
    if not seen:
        pytest.skip("no collision in 20000 tries on this machine")
    assert all("append on sequence" in m and "decode attention" in m for m in seen), seen
    # every refused append did nothing: layer 1 holds exactly the ones that returned
    assert cache.length(1, 0, s) == cache.length(1, 1, s) == appended
    assert torch.equal(cache.gather(0, 0, s)[0], layer0)
    assert issubclass(kvloom.ConcurrencyError, RuntimeError)


def test_different_sequences_do_not_collide():
    cache = kvloom.KVCache(1, 2, 16, block_size=4)
    seqs = [cache.add_sequence() for _ in range(4)]
    errors = []

    def work(s):
        try:
            for _ in range(200):
                cache.append(0, s, torch.randn(2, 2, 16), torch.randn(2, 2, 16))
                cache.attend(0, torch.randn(1, 4, 16), [s])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=work, args=(s,)) for s in seqs]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors and all(cache.seq_length(s) == 400 for s in seqs)


# --- strict inputs ----------------------------------------------------------------------------
def test_positions_out_of_int32_are_refused_not_wrapped():
    cache, s = small_cache()
    before = snapshot(cache)
    with pytest.raises(ValueError, match="positions must lie in"):
        cache.append(0, s, torch.randn(2, 1, 16), torch.randn(2, 1, 16), positions=torch.tensor([2**40 + 5]))
    with pytest.raises(TypeError, match="positions must be an integer"):
        cache.append(0, s, torch.randn(2, 1, 16), torch.randn(2, 1, 16), positions=torch.tensor([1.0]))
    same(before, snapshot(cache))
    cache.append(0, s, torch.randn(2, 1, 16), torch.randn(2, 1, 16), positions=torch.tensor([2**31 - 1]))
    assert cache.slots(0, 0, s)[2][-1] == 2**31 - 1


def test_classes_out_of_byte_range_are_refused():
    cache, s = small_cache()
    with pytest.raises(ValueError, match="classes must lie in"):
        cache.append(0, s, torch.randn(2, 1, 16), torch.randn(2, 1, 16), classes=torch.tensor([256]))
    with pytest.raises(TypeError, match="classes must be an integer"):
        cache.append(0, s, torch.randn(2, 1, 16), torch.randn(2, 1, 16), classes=torch.tensor([1.5]))


@pytest.mark.parametrize("slots,exc", [
    ([False, True], TypeError),
    (torch.tensor([False, True]), TypeError),
    (np.array([True]), TypeError),
    ([0.0, 1.0], TypeError),
    (torch.tensor([0.0]), TypeError),
    (np.array([1.5]), TypeError),
    ("01", TypeError),
    ([-1], IndexError),
    ([2**40], IndexError),
])
def test_evict_refuses_masks_floats_and_out_of_range(slots, exc):
    cache, s = small_cache()
    before = snapshot(cache)
    with pytest.raises(exc):
        cache.evict(0, 0, s, slots)
    same(before, snapshot(cache))
    cache.evict(0, 0, s, np.array([1, 2], dtype=np.int64))  # integer arrays are fine
    assert cache.length(0, 0, s) == 4


@pytest.mark.parametrize("call", [
    lambda c, s: c.seq_length(True),
    lambda c, s: c.fork(False),
    lambda c, s: c.drop(np.bool_(True)),
    lambda c, s: c.rollback(s, True),
    lambda c, s: c.length(0, True, s),
    lambda c, s: c.append(True, s, torch.randn(2, 1, 16), torch.randn(2, 1, 16)),
    lambda c, s: c.attend(0, torch.randn(1, 4, 16), [True]),
    lambda c, s: c.attend(0, torch.randn(1, 4, 16), [[(True, 0)]]),
    lambda c, s: c.chunk_attention(0, torch.randn(1, 4, 1, 16), [True]),
    lambda c, s: c.gather(0, 0, 1.0),
    lambda c, s: c.evict(0, 0, 0.0, [1]),
])
def test_bools_and_floats_are_not_ids(call):
    cache, s = small_cache()
    assert s == 0  # so True / 1.0 would have named a real sequence
    before = snapshot(cache)
    with pytest.raises(TypeError, match="must be an integer"):
        call(cache, s)
    same(before, snapshot(cache))


def test_pool_settings_must_agree_with_the_pool():
    pool = kvloom.BlockPool("float16", 16, 8, 64)
    kvloom.KVCache(1, 1, 16, pool=pool)  # storage settings from the pool
    kvloom.KVCache(1, 1, 16, pool=pool, dtype=torch.float16, block_size=8, device="cpu")  # agreeing is fine
    for kw, match in [(dict(dtype=torch.float32), "dtype"), (dict(block_size=16), "block_size"),
                      (dict(capacity_bytes=1 << 20), "capacity_bytes")]:
        with pytest.raises(ValueError, match=match):
            kvloom.KVCache(1, 1, 16, pool=pool, **kw)
    with pytest.raises(TypeError, match="BlockPool"):
        kvloom.KVCache(1, 1, 16, pool="pool")


def test_dense_attention_refuses_more_than_int32_tokens():
    q = torch.randn(1, 1, 1)
    k = torch.randn(1, 1, 1, 1).expand(1, 1, 2**31, 1)  # no memory behind it
    with pytest.raises(ValueError, match="at most"):
        kvloom.ops.decode_attention(q, k, k)
    with pytest.raises(ValueError, match="at most 2\\^31"):  # the C++ check, for C/C++ callers
        kvloom._core.decode_attention(q, [(k, k, None)], torch.empty(1, 1, 1), 0.0, None)


def test_bad_query_is_refused_before_any_copy(monkeypatch):
    import kvloom.ops as ops

    copies = []
    real = ops.kernel_ready
    monkeypatch.setattr(ops, "kernel_ready", lambda t: copies.append(t) or real(t))
    q = torch.randn(1, 4, 32).to(torch.int32)[..., ::2]  # wrong dtype, and a strided view that would be copied
    with pytest.raises(TypeError, match="q must be float32"):
        ops.decode_attention(q, torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16))
    assert copies == []
    cache, s = small_cache()
    with pytest.raises(TypeError, match="q must be float32"):
        cache.attend(0, q, [s])
    with pytest.raises(TypeError, match="q must be float32"):
        cache.chunk_attention(0, torch.zeros(1, 4, 1, 16, dtype=torch.int64), [s])
    assert copies == []


# --- the transformers cache -------------------------------------------------------------------
@pytest.mark.hf
def test_closed_cache_reports_nothing_held():
    from hf_helpers import tiny_model

    model = tiny_model("llama")
    kvloom.enable(model)
    cache = kvloom.Cache(model)
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 10)), **kvloom.hf.compat.cache_kwargs(cache))
    assert cache.get_seq_length() == 10 and cache.memory_bytes() > 0
    cache.close()
    assert cache.get_seq_length() == 0 and cache.memory_bytes() == 0 and cache.closed
    with pytest.raises(RuntimeError, match="closed"):
        cache.crop(5)


@pytest.mark.hf
def test_prompt_past_max_positions_warns_once():
    from hf_helpers import tiny_configs
    from transformers import AutoModelForCausalLM

    cfg = tiny_configs()["llama"]
    cfg.max_position_embeddings = 16
    model = AutoModelForCausalLM.from_config(cfg).eval()
    kvloom.enable(model)
    cache = kvloom.Cache(model)
    with torch.no_grad():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(torch.randint(0, 256, (1, 16)), **kvloom.hf.compat.cache_kwargs(cache))  # at the limit: quiet
        with pytest.warns(UserWarning, match="max_position_embeddings=16"):
            model(torch.randint(0, 256, (1, 4)), **kvloom.hf.compat.cache_kwargs(cache))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(torch.randint(0, 256, (1, 1)), **kvloom.hf.compat.cache_kwargs(cache))  # once per cache
