"""Decode attention kernels against kvloom.reference (float64 oracle)."""

import pytest
import torch
from hypothesis import given, strategies as st

import kvloom
from kvloom import reference as ref
from conftest import TOL

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (q heads, kv heads): MHA, GQA ratios 2, 3, 4, 7, 8 (odd ones: 9 -> 3, 14 -> 2), MQA 9 -> 1, 32 -> 1
HEADS = [(2, 2), (4, 4), (4, 2), (9, 3), (14, 2), (8, 2), (16, 2), (9, 1), (32, 1)]
HEAD_DIMS = [32, 64, 80, 128, 256]
MAX_ELEMS = 1 << 22  # bound the reference's memory: B * Hkv * T * D


def _inputs(B, Hq, Hkv, T, D, dtype, gen, peaky=1.0):
    q = (torch.randn(B, Hq, D, generator=gen) * peaky).to(dtype)
    k = torch.randn(B, Hkv, T, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, T, D, generator=gen).to(dtype)
    return q, k, v


def _close(out, expect, dtype):
    torch.testing.assert_close(out.double(), expect.to(out.dtype).double(), **TOL[dtype])


@given(
    B=st.integers(1, 3),
    heads=st.sampled_from(HEADS),
    D=st.sampled_from(HEAD_DIMS),
    T=st.integers(1, 4096),
    dtype=st.sampled_from(DTYPES),
    peaky=st.sampled_from([1.0, 4.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_dense_matches_reference(isa, B, heads, D, T, dtype, peaky, seed):
    Hq, Hkv = heads
    T = max(1, min(T, MAX_ELEMS // (B * Hkv * D)))
    q, k, v = _inputs(B, Hq, Hkv, T, D, dtype, torch.Generator().manual_seed(seed), peaky)
    out = kvloom.ops.decode_attention(q, k, v)
    assert out.shape == (B, Hq, D) and out.dtype == dtype
    _close(out, ref.decode_attention(q, k, v), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 32, 8, 4096, 128), (1, 32, 32, 1024, 128), (2, 32, 1, 4096, 64)])
def test_dense_large_cases(dtype, shape):
    B, Hq, Hkv, T, D = shape
    q, k, v = _inputs(B, Hq, Hkv, T, D, dtype, torch.Generator().manual_seed(7))
    _close(kvloom.ops.decode_attention(q, k, v), ref.decode_attention(q, k, v), dtype)


def test_odd_head_dim_uses_portable_path():
    # head_dim not a multiple of 8 takes the generic kernel even when AVX2 is present
    gen = torch.Generator().manual_seed(1)
    q, k, v = _inputs(2, 6, 3, 77, 36, torch.float32, gen)
    _close(kvloom.ops.decode_attention(q, k, v), ref.decode_attention(q, k, v), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_and_strided_inputs(isa, dtype):
    # half-precision rows are widened in registers by the AVX-512 tiles: strided rows reach them as is
    gen = torch.Generator().manual_seed(2)
    q, k, v = _inputs(2, 8, 2, 300, 64, dtype, gen)
    kt = k.transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous last dim
    vs = torch.randn(2, 2, 600, 64, generator=gen).to(dtype)[:, :, ::2]  # strided rows
    ks = torch.randn(2, 2, 300, 96, generator=gen).to(dtype)[..., 16:80]  # row stride 96, offset 16
    _close(kvloom.ops.decode_attention(q, kt, vs, scale=0.3), ref.decode_attention(q, k, vs, 0.3), dtype)
    _close(kvloom.ops.decode_attention(q, ks, vs), ref.decode_attention(q, ks, vs), dtype)


def test_matches_torch_sdpa():
    gen = torch.Generator().manual_seed(3)
    q, k, v = _inputs(2, 32, 8, 513, 128, torch.float32, gen)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True).squeeze(2)
    torch.testing.assert_close(kvloom.ops.decode_attention(q, k, v), sdpa, atol=2e-5, rtol=1e-4)


def test_thread_counts_agree():
    gen = torch.Generator().manual_seed(4)
    q, k, v = _inputs(1, 8, 1, 4096, 128, torch.float32, gen)
    before = kvloom.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            kvloom.set_num_threads(n)
            assert kvloom.get_num_threads() == n
            outs.append(kvloom.ops.decode_attention(q, k, v))
    finally:
        kvloom.set_num_threads(before)
    expect = ref.decode_attention(q, k, v)
    for o in outs:
        _close(o, expect, torch.float32)


def _inv_freq(D, rot=None, base=10000.0):
    rot = D if rot is None else rot
    return 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)).float()


@given(
    B=st.integers(1, 3),
    heads=st.sampled_from(HEADS),
    D=st.sampled_from([64, 128]),
    partial=st.booleans(),
    lens=st.lists(st.integers(0, 300), min_size=1, max_size=4),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_segments_rotate_queries(isa, B, heads, D, partial, lens, dtype, seed):
    """Rotating the query per segment == attention over keys re-rotated to view positions."""
    Hq, Hkv = heads
    if sum(lens) == 0:
        lens[0] = 1
    gen = torch.Generator().manual_seed(seed)
    inv_freq = _inv_freq(D, D // 2 if partial else D)
    q = torch.randn(B, Hq, D, generator=gen).to(dtype)
    segs = []
    for T in lens:
        k = torch.randn(B, Hkv, T, D, generator=gen).to(dtype)
        v = torch.randn(B, Hkv, T, D, generator=gen).to(dtype)
        delta = torch.randint(-5000, 5000, (B,), generator=gen).tolist()
        segs.append((k, v, delta))
    out = kvloom.ops.decode_attention_segments(q, segs, inv_freq=inv_freq)
    expect = ref.segment_attention(q, segs, inv_freq)
    # the rotation adds fp32 angle/cos/sin rounding on top of the kernel's tolerance
    tol = {k: v * 4 for k, v in TOL[dtype].items()}
    torch.testing.assert_close(out.double(), expect.to(dtype).double(), **tol)


def test_segment_rotation_is_rope_shift():
    """A key block stored at local positions and seen at offset o: rotating q by
    (own - o) equals RoPE-encoding keys at their absolute positions."""
    D, T = 64, 40
    gen = torch.Generator().manual_seed(5)
    inv_freq = _inv_freq(D)
    q_raw = torch.randn(1, 4, D, generator=gen)
    k_raw = torch.randn(1, 2, T, D, generator=gen)
    v = torch.randn(1, 2, T, D, generator=gen)
    own, seg_off = 300, 120
    local = torch.arange(T)
    k_local = ref.rotate(k_raw, local.view(1, 1, T), inv_freq).float()           # stored keys
    k_abs = ref.rotate(k_raw, (seg_off + local).view(1, 1, T), inv_freq).float()  # keys at view positions
    q_local = ref.rotate(q_raw, torch.zeros(1, 4), inv_freq).float()              # q at own-local position 0
    q_abs = ref.rotate(q_raw, torch.full((1, 4), own), inv_freq).float()
    out = kvloom.ops.decode_attention_segments(q_local, [(k_local, v, [own - seg_off])], inv_freq=inv_freq)
    torch.testing.assert_close(out, ref.decode_attention(q_abs, k_abs, v).float(), atol=1e-4, rtol=1e-4)


def _cache_with_ragged_heads(dtype, n_kv, D, lens_per_head, gen, block_size=16):
    """A one-layer cache whose heads end with different live lengths (random evictions)."""
    cache = kvloom.KVCache(1, n_kv, D, dtype=dtype, block_size=block_size)
    seq = cache.add_sequence()
    T = max(lens_per_head) + 20
    k = torch.randn(n_kv, T, D, generator=gen)
    v = torch.randn(n_kv, T, D, generator=gen)
    cache.append(0, seq, k, v)
    for h, keep in enumerate(lens_per_head):
        slots, _, _ = cache.slots(0, h, seq)
        perm = torch.randperm(len(slots), generator=gen)[: len(slots) - keep]
        cache.evict(0, h, seq, slots[perm.numpy()])
    return cache, seq


@given(
    heads=st.sampled_from(HEADS),
    D=st.sampled_from(HEAD_DIMS),
    dtype=st.sampled_from(DTYPES),
    block_size=st.sampled_from([1, 16, 32]),
    data=st.data(),
)
def test_cache_attention_ragged_heads(isa, heads, D, dtype, block_size, data):
    Hq, Hkv = heads
    lens = data.draw(st.lists(st.integers(1, 600), min_size=Hkv, max_size=Hkv))
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    cache, seq = _cache_with_ragged_heads(dtype, Hkv, D, lens, gen, block_size)
    assert [cache.length(0, h, seq) for h in range(Hkv)] == lens
    q = torch.randn(1, Hq, D, generator=gen).to(dtype)
    out = cache.attend(0, q, [seq])
    G = Hq // Hkv
    for h in range(Hkv):
        k, v, _, _ = cache.gather(0, h, seq)
        expect = ref.decode_attention(q[:, h * G:(h + 1) * G], k[None, None], v[None, None])
        _close(out[:, h * G:(h + 1) * G], expect, dtype)


def test_cache_attention_batch_of_sequences_and_views():
    gen = torch.Generator().manual_seed(6)
    D, Hkv, Hq = 64, 2, 6
    inv_freq = _inv_freq(D)
    cache = kvloom.KVCache(2, Hkv, D)
    a, b = cache.add_sequence(), cache.add_sequence()
    for layer in range(2):
        cache.append(layer, a, torch.randn(Hkv, 50, D, generator=gen), torch.randn(Hkv, 50, D, generator=gen))
        cache.append(layer, b, torch.randn(Hkv, 70, D, generator=gen), torch.randn(Hkv, 70, D, generator=gen))
    q = torch.randn(2, Hq, D, generator=gen)
    out = cache.attend(1, q, [a, b])
    ka, va, _, _ = zip(*[cache.gather(1, h, a) for h in range(Hkv)])
    kb, vb, _, _ = zip(*[cache.gather(1, h, b) for h in range(Hkv)])
    _close(out[:1], ref.decode_attention(q[:1], torch.stack(ka)[None], torch.stack(va)[None]), torch.float32)
    _close(out[1:], ref.decode_attention(q[1:], torch.stack(kb)[None], torch.stack(vb)[None]), torch.float32)
    # row 0 sees [a at delta 70, b at delta 0]; row 1 sees only b
    out2 = cache.attend(1, q, [[(a, 70), (b, 0)], [b]], inv_freq=inv_freq)
    kA, vA = torch.stack(ka)[None], torch.stack(va)[None]
    kB, vB = torch.stack(kb)[None], torch.stack(vb)[None]
    e0 = ref.segment_attention(q[:1], [(kA, vA, [70]), (kB, vB, [0])], inv_freq)
    torch.testing.assert_close(out2[:1].double(), e0, atol=1e-4, rtol=1e-4)
    _close(out2[1:], ref.decode_attention(q[1:], kB, vB), torch.float32)


def test_empty_head_gives_zeros():
    cache = kvloom.KVCache(1, 2, 64)
    s = cache.add_sequence()
    cache.append(0, s, torch.randn(2, 3, 64), torch.randn(2, 3, 64))
    slots, _, _ = cache.slots(0, 1, s)
    cache.evict(0, 1, s, slots)
    out = cache.attend(0, torch.randn(1, 4, 64), [s])
    assert torch.all(out[:, 2:] == 0) and torch.all(out[:, :2] != 0)


def test_nan_propagates():
    q, k, v = _inputs(1, 4, 2, 40, 64, torch.float32, torch.Generator().manual_seed(8))
    v[0, 0, 5, 3] = float("nan")
    out = kvloom.ops.decode_attention(q, k, v)
    assert torch.isnan(out[0, :2, 3]).all() and not torch.isnan(out[0, 2:]).any()
