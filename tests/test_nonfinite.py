"""NaN and ±inf: kvloom's attention gives what torch's SDPA (math backend, fp32) gives on the
tokens a query sees — a NaN score makes the head's output NaN, +inf scores give NaN, -inf
scores weight 0 (all of them -inf: zeros, torch's "safe" softmax), non-finite values reach the
output through p·v — and tokens it does not see (evicted, causally later, masked) never affect
it, whatever they hold. A query that sees no token gets zeros."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

import kvloom

BAD = [float("nan"), float("inf"), -float("inf")]


def sdpa_math(q, k, v, scale=None):
    """q [..., Tq, D], k/v [..., T, D] (same heads), fp32 math backend."""
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)


def assert_same(out, ref):
    out, ref = out.float(), ref.float()
    assert torch.equal(out.isnan(), ref.isnan()), f"NaN pattern differs:\n{out.isnan().nonzero().tolist()}\nvs\n{ref.isnan().nonzero().tolist()}"
    assert torch.equal(out.isposinf(), ref.isposinf()) and torch.equal(out.isneginf(), ref.isneginf()), "inf pattern differs"
    fin = ref.isfinite()
    torch.testing.assert_close(out[fin], ref[fin], atol=1e-4, rtol=1e-3)


def poke(draw, t, n_max=3):
    """Puts up to n_max non-finite values at drawn positions of t (in place)."""
    flat = t.view(-1)
    for _ in range(draw(st.integers(0, n_max))):
        flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from(BAD))


def test_sdpa_reference_is_the_math_not_the_fused_kernel():
    # why the tests compare with the math backend: torch's fused CPU kernel returns zeros for a
    # NaN query, the math (and kvloom) NaN
    q, k, v = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
    q[..., 3] = float("nan")
    assert sdpa_math(q, k, v).isnan().all()
    out = kvloom.ops.decode_attention(q[:, :, 0], k, v)
    assert out.isnan().all()


@given(data=st.data(), heads=st.sampled_from([(4, 2), (9, 3), (3, 1), (2, 2)]), T=st.integers(1, 70),
       D=st.sampled_from([16, 64]), B=st.integers(1, 2))
def test_dense_decode_matches_sdpa_math(isa, data, heads, T, D, B):
    Hq, Hkv = heads
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    q, k, v = torch.randn(B, Hq, D, generator=g), torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    for t in (q, k, v):
        poke(data.draw, t)
    out = kvloom.ops.decode_attention(q, k, v)
    G = Hq // Hkv
    ref = sdpa_math(q[:, :, None], k.repeat_interleave(G, 1), v.repeat_interleave(G, 1))[:, :, 0]
    assert_same(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("what", ["q", "k", "v"])
@pytest.mark.parametrize("bad", BAD)
def test_every_dtype_single_nonfinite(dtype, what, bad):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 64, dtype=dtype), torch.randn(1, 2, 33, 64, dtype=dtype), torch.randn(1, 2, 33, 64, dtype=dtype)
    {"q": q[0, 1, 5:6], "k": k[0, 0, 7, 5:6], "v": v[0, 0, 7, 5:6]}[what].fill_(bad)
    out = kvloom.ops.decode_attention(q, k, v)
    assert out.dtype == dtype
    ref = sdpa_math(q[:, :, None], k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))[:, :, 0]
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    if what == "q" and bad != bad:
        assert out[0, 1].isnan().all() and out[0, [0, 2, 3]].isfinite().all()  # only that head


def test_all_scores_neg_inf_is_zero_like_no_key():
    q = torch.ones(1, 1, 8)
    k = torch.full((1, 1, 4, 8), -float("inf"))
    v = torch.randn(1, 1, 4, 8)
    # torch's math SDPA uses a "safe" softmax: a row of -inf scores gives zeros, not NaN
    assert torch.equal(sdpa_math(q[:, :, None], k, v)[:, :, 0], torch.zeros(1, 1, 8))
    assert torch.equal(kvloom.ops.decode_attention(q, k, v), torch.zeros(1, 1, 8))
    cache = kvloom.KVCache(1, 1, 8, block_size=4)
    s = cache.add_sequence()
    cache.append(0, s, torch.randn(1, 3, 8), torch.randn(1, 3, 8))
    cache.evict(0, 0, s, [0, 1, 2])
    assert torch.equal(cache.attend(0, torch.randn(1, 1, 8), [s]), torch.zeros(1, 1, 8))  # sees nothing


@given(data=st.data(), T=st.integers(1, 60), block=st.sampled_from([4, 16]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_cache_attention_ignores_evicted_nonfinite_rows(isa, data, T, block, dtype):
    Hq, Hkv, D = 6, 2, 16
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    k, v = torch.randn(Hkv, T, D, generator=g), torch.randn(Hkv, T, D, generator=g)
    q = torch.randn(1, Hq, D, generator=g)
    for t in (q, k, v):
        poke(data.draw, t)
    cache = kvloom.KVCache(1, Hkv, D, dtype=dtype, block_size=block)
    s = cache.add_sequence()
    cache.append(0, s, k, v)
    for h in range(Hkv):  # evict a drawn subset (they may be the NaN ones)
        gone = data.draw(st.lists(st.integers(0, T - 1), unique=True, max_size=T))
        if gone:
            cache.evict(0, h, s, gone)
    out = cache.attend(0, q, [s])
    G = Hq // Hkv
    for h in range(Hkv):
        kk, vv, _, _ = cache.gather(0, h, s, dtype=torch.float32)
        if kk.shape[0] == 0:
            assert torch.equal(out[0, h * G:(h + 1) * G], torch.zeros(G, D))
            continue
        ref = sdpa_math(q[0, h * G:(h + 1) * G, None], kk.expand(G, -1, -1), vv.expand(G, -1, -1))[:, 0]
        assert_same(out[0, h * G:(h + 1) * G], ref)


@given(data=st.data(), past=st.integers(0, 40), Tq=st.integers(1, 20), masked=st.booleans())
def test_chunk_attention_sees_only_visible_tokens(isa, data, past, Tq, masked):
    Hq, Hkv, D = 4, 2, 16
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    n = past + Tq
    k, v = torch.randn(Hkv, n, D, generator=g), torch.randn(Hkv, n, D, generator=g)
    q = torch.randn(1, Hq, Tq, D, generator=g)
    for t in (q, k, v):
        poke(data.draw, t, n_max=4)
    mask = None
    if masked:
        mask = torch.tril(torch.ones(Tq, n, dtype=torch.bool), diagonal=past)[None].clone()
        mask[0, :, :data.draw(st.integers(0, n))] = False  # left padding: hides a prefix
    cache = kvloom.KVCache(1, Hkv, D, block_size=8)
    s = cache.add_sequence()
    cache.append(0, s, k, v)
    out = cache.chunk_attention(0, q, [s], mask=mask)
    G = Hq // Hkv
    scale = 1 / math.sqrt(D)
    for h in range(Hkv):
        for t in range(Tq):
            vis = torch.arange(n) <= past + t
            if mask is not None:
                vis &= mask[0, t]
            got = out[0, h * G:(h + 1) * G, t]
            if not vis.any():
                assert torch.equal(got, torch.zeros(G, D))
                continue
            ref = sdpa_math(q[0, h * G:(h + 1) * G, t, None], k[h, vis].expand(G, -1, -1), v[h, vis].expand(G, -1, -1),
                            scale=scale)[:, 0]
            assert_same(got, ref)


@given(shape=st.lists(st.integers(0, 5), min_size=1, max_size=4), dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
       bad=st.lists(st.tuples(st.integers(0, 10 ** 6), st.sampled_from(BAD + [65504.0, -3e38, 1e-40])), max_size=3),
       view=st.sampled_from(["plain", "transposed", "strided"]), seed=st.integers(0, 2 ** 16))
def test_all_finite_equals_torch(shape, dtype, bad, view, seed):
    """kvloom._core.all_finite (the HF adapter's check on every cached K/V) == torch.isfinite(x).all(),
    for every float dtype, non-contiguous views, huge and subnormal finite values included."""
    dt = getattr(torch, dtype)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 100).to(dt)
    flat = x.view(-1)
    for i, val in bad:
        if flat.numel():
            flat[i % flat.numel()] = val
    if view == "transposed" and x.dim() >= 2:
        x = x.transpose(0, -1)
    elif view == "strided" and x.dim() >= 1:
        x = x[..., ::2]
    assert kvloom._core.all_finite(x) == bool(torch.isfinite(x).all())
