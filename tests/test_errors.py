"""Bad input: a clear Python exception naming what was wrong, and nothing changed."""
import numpy as np
import pytest
import torch

import kvloom


@pytest.fixture
def filled():
    cache = kvloom.KVCache(2, 2, 16, block_size=4)
    s = cache.add_sequence()
    for layer in range(2):
        cache.append(layer, s, torch.randn(2, 6, 16), torch.randn(2, 6, 16))
    return cache, s


def snapshot(cache):
    out = []
    for s in cache.sequences():
        for layer in range(cache.n_layers):
            for h in range(cache.n_kv_heads):
                k, v, o, p = cache.gather(layer, h, s)
                out.append((s, layer, h, k.clone(), v.clone(), o.tolist(), p.tolist()))
    return out, cache.memory_bytes(), cache.pool.used_blocks


def same(a, b):
    (xa, ma, ua), (xb, mb, ub) = a, b
    assert ma == mb and ua == ub and len(xa) == len(xb)
    for ra, rb in zip(xa, xb):
        assert ra[:3] == rb[:3] and torch.equal(ra[3], rb[3]) and torch.equal(ra[4], rb[4]) and ra[5:] == rb[5:]


q = torch.randn(1, 8, 64)
k = torch.randn(1, 2, 10, 64)


@pytest.mark.parametrize("args,exc,match", [
    ((q[0], k, k), ValueError, "q must be"),                                   # wrong rank
    ((q, k[0], k[0]), ValueError, "k must have 4 dimensions"),
    ((q, k, k[:, :, :5]), ValueError, "same length"),
    ((torch.randn(1, 6, 64), torch.randn(1, 4, 10, 64), torch.randn(1, 4, 10, 64)), ValueError, "multiple of kv heads"),
    ((q, torch.randn(1, 2, 10, 32), torch.randn(1, 2, 10, 32)), ValueError, "head_dim"),
    ((q, torch.randn(2, 2, 10, 64), torch.randn(2, 2, 10, 64)), ValueError, "batch"),
    ((q.double(), k, k), TypeError, "float32, float16 or bfloat16"),
    ((q, k.double(), k.double()), TypeError, "float64|unsupported dtype"),
    ((q, k.int(), k.int()), TypeError, "float32, float16 or bfloat16"),
    ((q, k, k.half()), TypeError, "share one dtype"),
    ((q, torch.randn(1, 2, 0, 64), torch.randn(1, 2, 0, 64)), ValueError, "at least one key"),
    ((q, [1, 2], k), TypeError, "torch.Tensor or numpy.ndarray"),
])
def test_decode_attention_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        kvloom.ops.decode_attention(*args)


def test_bad_scale_and_device():
    with pytest.raises(ValueError, match="scale"):
        kvloom.ops.decode_attention(q, k, k, scale=-1.0)
    with pytest.raises(ValueError, match="scale"):
        kvloom.ops.decode_attention(q, k, k, scale=float("nan"))
    meta = torch.empty(1, 8, 64, device="meta")
    with pytest.raises(ValueError, match="CPU"):
        kvloom.ops.decode_attention(meta, k, k)
    with pytest.raises(ValueError, match="inv_freq"):
        kvloom.ops.decode_attention_segments(q, [(k, k, [3])])  # rotation without inv_freq
    with pytest.raises(ValueError, match="head_dim/2"):
        kvloom.ops.decode_attention_segments(q, [(k, k, [3])], inv_freq=torch.ones(40))


def test_requires_grad_inputs_are_fine():
    qq = q.clone().requires_grad_()
    out = kvloom.ops.decode_attention(qq, k, k)
    assert out.shape == q.shape


@pytest.mark.parametrize("call,exc,match", [
    (lambda c, s: c.append(0, s, torch.randn(2, 3), torch.randn(2, 3)), ValueError, "3 dimensions"),
    (lambda c, s: c.append(0, s, torch.randn(3, 2, 16), torch.randn(3, 2, 16)), ValueError, "n_kv_heads=2"),
    (lambda c, s: c.append(0, s, torch.randn(2, 2, 8), torch.randn(2, 2, 8)), ValueError, "head_dim=16"),
    (lambda c, s: c.append(0, s, torch.randn(2, 2, 16), torch.randn(2, 3, 16)), ValueError, "shape of k"),
    (lambda c, s: c.append(0, s, torch.randn(2, 2, 16).double(), torch.randn(2, 2, 16).double()), TypeError, "dtype"),
    (lambda c, s: c.append(0, s, torch.randn(2, 2, 16), torch.randn(2, 2, 16), positions=torch.arange(3)), ValueError, "positions"),
    (lambda c, s: c.append(0, s, torch.randn(2, 2, 16), torch.randn(2, 2, 16), positions=torch.ones(2)), TypeError, "integer"),
    (lambda c, s: c.append(2, s, torch.randn(2, 2, 16), torch.randn(2, 2, 16)), IndexError, "layer 2 out of range"),
    (lambda c, s: c.append(-1, s, torch.randn(2, 2, 16), torch.randn(2, 2, 16)), IndexError, "layer -1"),
    (lambda c, s: c.append(0, 7, torch.randn(2, 2, 16), torch.randn(2, 2, 16)), IndexError, "sequence 7 does not exist"),
    (lambda c, s: c.rollback(s, -1), ValueError, "n_tokens must be >= 0"),
    (lambda c, s: c.rollback(s, 7), ValueError, "cannot roll back 7"),
    (lambda c, s: c.rollback(9, 1), IndexError, "sequence 9"),
    (lambda c, s: c.fork(-3), IndexError, "sequence -3"),
    (lambda c, s: c.drop(5), IndexError, "sequence 5"),
    (lambda c, s: c.evict(0, 2, s, [0]), IndexError, "kv head 2"),
    (lambda c, s: c.evict(0, 0, s, [0, 99]), IndexError, "slot 99"),
    (lambda c, s: c.evict(0, 0, s, [1, 1]), ValueError, "named twice"),
    (lambda c, s: c.evict(0, 0, s, [-1]), IndexError, "slot -1"),
    (lambda c, s: c.length(0, 5, s), IndexError, "kv head 5"),
    (lambda c, s: c.attend(0, torch.randn(1, 3, 16), [s]), ValueError, "multiple of the cache's kv heads"),
    (lambda c, s: c.attend(0, torch.randn(2, 4, 16), [s]), ValueError, "one view per batch row"),
    (lambda c, s: c.attend(0, torch.randn(1, 4, 32), [s]), ValueError, "head_dim"),
    (lambda c, s: c.attend(3, torch.randn(1, 4, 16), [s]), IndexError, "layer 3"),
    (lambda c, s: c.attend(0, torch.randn(1, 4, 16), [[(s, 5)]]), ValueError, "inv_freq"),
    (lambda c, s: c.attend(0, torch.randn(1, 4, 16), [[]]), ValueError, "at least one sequence"),
])
def test_cache_bad_input_leaves_cache_unchanged(filled, call, exc, match):
    cache, s = filled
    before = snapshot(cache)
    with pytest.raises(exc, match=match):
        call(cache, s)
    same(before, snapshot(cache))


def test_evict_after_partial_validation_changes_nothing(filled):
    cache, s = filled
    slots, _, _ = cache.slots(0, 0, s)
    before = snapshot(cache)
    with pytest.raises(IndexError):
        cache.evict(0, 0, s, [int(slots[0]), int(slots[1]), 1000])
    same(before, snapshot(cache))


def test_dropped_sequence_is_gone(filled):
    cache, s = filled
    cache.drop(s)
    with pytest.raises(IndexError, match="dropped"):
        cache.append(0, s, torch.randn(2, 1, 16), torch.randn(2, 1, 16))
    with pytest.raises(IndexError):
        cache.drop(s)
    assert cache.pool.used_blocks == 0


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(dtype=torch.float64), TypeError, "KV dtype"),
    (dict(dtype="int8"), TypeError, "unknown KV dtype"),
    (dict(block_size=0), ValueError, "block_size"),
    (dict(capacity_bytes=10), ValueError, "holds no block"),
    (dict(policy="no_such_policy"), ValueError, "unknown policy"),
    (dict(policy=3), TypeError, "policy"),
])
def test_cache_construction_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        kvloom.KVCache(2, 2, 16, **kwargs)


def test_pool_and_policy_construction_errors():
    with pytest.raises(ValueError, match="capacity_blocks"):
        kvloom.BlockPool("float32", 16, 4, capacity_blocks=0)
    with pytest.raises(ValueError, match="head_dim"):
        kvloom.BlockPool("float32", 0, 4, capacity_blocks=4)
    with pytest.raises(TypeError, match="unknown KV dtype"):
        kvloom.BlockPool("float64", 16, 4, capacity_blocks=4)
    with pytest.raises(ValueError, match="recent"):
        kvloom.Window(4, 0)
    with pytest.raises(ValueError, match="sinks"):
        kvloom.Window(-1, 10)
    with pytest.raises(ValueError, match="n_layers"):
        kvloom.KVCache(0, 2, 16)
    with pytest.raises(ValueError, match="n_kv_heads"):
        kvloom.KVCache(2, 0, 16)


def test_numpy_read_only_inputs_and_threads():
    with pytest.raises(ValueError, match="num_threads"):
        kvloom.set_num_threads(0)
    a = np.arange(32, dtype=np.float32).reshape(2, 1, 16)
    a.flags.writeable = False
    cache = kvloom.KVCache(1, 2, 16)
    s = cache.add_sequence()
    cache.append(0, s, a, a)
    k, _, _, _ = cache.gather(0, 1, s)
    assert k[0].tolist() == a[1, 0].tolist()
