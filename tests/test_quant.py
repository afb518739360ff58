"""Quantized KV blocks (issue 15, first stage: the format and the kernels that read it):
the C++ quantizer writes exactly the bytes kvloom.reference.quantize_block defines, every kernel
path dequantizes them bit for bit as the reference does, the error stays within half a step,
and attention over quantized blocks equals reference attention over the dequantized K/V."""
import pytest
import torch
from hypothesis import given, strategies as st

import kvloom
from kvloom import ops, reference as ref
from conftest import TOL

BITS = [8, 4, 2]


def rows(g, n, D, spread):
    x = torch.randn(n, D, generator=g) * spread
    x[:, 0] *= 20  # an outlier channel, as keys have
    return x


@given(bits=st.sampled_from(BITS), bs=st.sampled_from([1, 4, 16, 32]), D=st.sampled_from([8, 40, 64, 128]),
       data=st.data(), spread=st.sampled_from([1e-3, 1.0, 300.0]))
def test_quantizer_writes_the_reference_bytes(isa, bits, bs, D, data, spread):
    n = data.draw(st.integers(1, bs))
    T = data.draw(st.integers(n, 3 * bs))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    k, v = rows(g, T, D, spread), rows(g, T, D, spread)
    q = ops.quantize_kv(k[None, None], v[None, None], bits, bs)
    assert q.blocks.shape[-1] == ref.quant_block_bytes(bits, bs, D) == kvloom._core.quant_block_bytes(bits, bs, D)
    kk, vv = ops.dequantize_kv(q)
    for b in range(q.blocks.shape[2]):
        lo, hi = b * bs, min(T, (b + 1) * bs)
        want = ref.quantize_block(k[lo:hi], v[lo:hi], bits, bs)
        assert torch.equal(q.blocks[0, 0, b], want), f"block {b}"
        rk, rv = ref.dequantize_block(want, bits, bs, D, hi - lo)
        assert torch.equal(kk[0, 0, lo:hi], rk) and torch.equal(vv[0, 0, lo:hi], rv)  # bit for bit, every ISA


def minmax_block(k, v, bits, bs, live=None):
    """The block with the 2-bit refits switched off: every range its group's (min, max)."""
    import unittest.mock as mock
    with mock.patch.object(ref, "quant_refits", lambda bits: 0):
        return ref.quantize_block(k, v, bits, bs, live=live)


@given(bits=st.sampled_from(BITS), D=st.sampled_from([16, 64]), n=st.integers(1, 32), data=st.data())
def test_error_within_the_format_bound(bits, D, n, data):
    """8 and 4 bits: every element within half a step of its input (min-max ranges). 2 bits:
    the refit ranges may clip, but each group's squared error is at most its min-max range's
    (a refit is kept only when it lowers it), and elements inside the range are within half a step."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    scale = data.draw(st.sampled_from([2.0, 300.0]))
    k, v = rows(g, n, D, scale), rows(g, n, D, scale)
    live = torch.rand(n, generator=g) > 0.3
    live[0] = True
    levels = (1 << bits) - 1
    blk = ref.quantize_block(k, v, bits, 32, live=live)
    kk, vv = ref.dequantize_block(blk, bits, 32, D, n)
    mk, mv = ref.dequantize_block(minmax_block(k, v, bits, 32, live), bits, 32, D, n)
    params = blk[32 * D * bits // 8:32 * D * bits // 8 + 4 * D].view(torch.float16).float().reshape(2, D)
    kmin, kstep = params[0], params[1]
    gv = ref.quant_value_group(D, bits)
    assert gv == (16 if bits == 2 else 32) or gv == D
    tol = 1e-6 * k.abs().amax() + 1e-7
    inside = (k >= kmin) & (k <= kmin + levels * kstep)
    err = (kk - k).abs()
    assert bool((err <= kstep / 2 + tol)[live[:, None] & inside].all())
    if bits != 2:
        assert torch.equal(kk, mk) and torch.equal(vv, mv)  # no refits: the min-max ranges
        span = v.reshape(n, D // gv, gv)
        vstep = (span.amax(-1) - span.amin(-1)) / levels
        verr = (vv - v).abs().reshape(n, D // gv, gv).amax(-1)[live]
        assert bool((verr <= vstep[live] / 2 * (1 + 2**-9) + 1e-3 * span.abs().amax() * 2**-10 + 1e-7).all())
    # per group squared error: at most the min-max range's (keys per channel, values per token group)
    sq = lambda a, b: (a.double() - b.double()) ** 2
    lm = live[:, None].double()
    assert bool(((sq(kk, k) * lm).sum(0) <= (sq(mk, k) * lm).sum(0) * (1 + 1e-12)).all())
    vs = sq(vv, v).reshape(n, D // gv, gv).sum(-1)[live]
    assert bool((vs <= sq(mv, v).reshape(n, D // gv, gv).sum(-1)[live] * (1 + 1e-12)).all())


def test_two_bit_refits_lower_the_error():
    """The 2-bit refits are a real search: over many random groups they lower the squared error
    below the min-max range's, and never raise it."""
    g = torch.Generator().manual_seed(7)
    k, v = torch.randn(32, 64, generator=g), torch.randn(32, 64, generator=g)
    blk = ref.quantize_block(k, v, 2, 32)
    kk, vv = ref.dequantize_block(blk, 2, 32, 64, 32)
    mm = minmax_block(k, v, 2, 32)
    mk, mv = ref.dequantize_block(mm, 2, 32, 64, 32)
    for x, got, base in ((k, kk, mk), (v, vv, mv)):
        assert float(((got - x) ** 2).sum()) < 0.9 * float(((base - x) ** 2).sum())
    assert not torch.equal(blk, mm)
    assert torch.equal(ops.quantize_kv(k[None, None], v[None, None], 2, 32).blocks[0, 0, 0], blk)  # the C++ quantizer


@given(bits=st.sampled_from(BITS), heads=st.sampled_from([(9, 3), (8, 1), (4, 4), (32, 8)]),
       D=st.sampled_from([64, 128, 40]), T=st.integers(1, 200), B=st.integers(1, 2), bs=st.sampled_from([16, 32]),
       data=st.data())
def test_attention_over_quantized_blocks(isa, bits, heads, D, T, B, bs, data):
    Hq, Hkv = heads
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    k, v = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    q = torch.randn(B, Hq, D, generator=g)
    qkv = ops.quantize_kv(k, v, bits, bs)
    kk, vv = ops.dequantize_kv(qkv)
    out = ops.decode_attention(q, qkv)
    torch.testing.assert_close(out.double(), ref.decode_attention(q, kk, vv), **TOL[torch.float32])


def test_fewer_bytes():
    k = torch.randn(1, 3, 4096, 64)
    full = k.numel() * 2 * 2  # fp16 keys and values
    for bits, most in ((8, 0.57), (4, 0.32), (2, 0.22)):  # 2 bits: value groups of 16 channels
        assert ops.quantize_kv(k, k, bits).nbytes <= most * full


@pytest.mark.parametrize("call,exc,match", [
    (lambda: ops.quantize_kv(torch.randn(1, 1, 4, 12), torch.randn(1, 1, 4, 12)), ValueError, "multiple of 8"),
    (lambda: ops.quantize_kv(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), bits=3), ValueError, "8, 4 or 2"),
    (lambda: ops.quantize_kv(torch.full((1, 1, 4, 8), float("nan")), torch.randn(1, 1, 4, 8)), ValueError, "not finite"),
    (lambda: ops.quantize_kv(torch.full((1, 1, 4, 8), 1e5), torch.randn(1, 1, 4, 8)), ValueError, "65504"),
    (lambda: ops.quantize_kv(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 5, 8)), ValueError, "one shape"),
    (lambda: ops.quantize_kv(torch.randn(1, 1, 4, 8).int(), torch.randn(1, 1, 4, 8)), TypeError, "float32"),
    (lambda: ops.decode_attention(torch.randn(1, 2, 16), ops.quantize_kv(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8))),
     ValueError, "head_dim"),
    (lambda: ops.decode_attention(torch.randn(1, 2, 8), ops.quantize_kv(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)),
                                  torch.randn(1, 1, 4, 8)), TypeError, "leave v out"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
