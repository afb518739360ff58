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


@given(bits=st.sampled_from(BITS), D=st.sampled_from([16, 64]), n=st.integers(1, 32), data=st.data())
def test_error_within_half_a_step(bits, D, n, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    k, v = rows(g, n, D, 2.0), rows(g, n, D, 2.0)
    live = torch.rand(n, generator=g) > 0.3
    live[0] = True
    blk = ref.quantize_block(k, v, bits, 32, live=live)
    kk, vv = ref.dequantize_block(blk, bits, 32, D, n)
    params = blk[32 * D * bits // 8:32 * D * bits // 8 + 4 * D].view(torch.float16).float().reshape(2, D)
    kstep = params[1]
    err = (kk - k).abs()[live]
    assert bool((err <= kstep / 2 + 1e-6 * k.abs().amax() + 1e-7).all())
    gv = ref.quant_value_group(D)
    span = v.reshape(n, D // gv, gv)
    vstep = (span.amax(-1) - span.amin(-1)) / ((1 << bits) - 1)
    verr = (vv - v).abs().reshape(n, D // gv, gv).amax(-1)[live]
    assert bool((verr <= vstep[live] / 2 * (1 + 2**-9) + 1e-3 * span.abs().amax() * 2**-10 + 1e-7).all())


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
    for bits, most in ((8, 0.57), (4, 0.32), (2, 0.19)):
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
