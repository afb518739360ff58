"""Dense entry points to kvloom's kernels, for benchmarking and for other serving stacks.

The functions take torch tensors (or anything exporting DLPack, e.g. numpy arrays) on the
CPU or on a CUDA device (all on the same one), in float32, float16 or bfloat16, and return a
tensor of the query's type on its device. CUDA work runs on torch's current stream.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from . import _core
from ._tensors import as_tensor, host, kernel_ready, use_stream

__all__ = ["decode_attention", "decode_attention_segments", "QuantizedKV", "quantize_kv", "dequantize_kv"]


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_MAX_TOKENS = 2**31 - 1  # token indices are int32 in the kernels


def _check_float(t: torch.Tensor, what: str) -> None:
    if t.dtype not in _FLOATS:
        raise TypeError(f"{what} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_q(q: torch.Tensor, rank: int = 3) -> None:
    """Shape and dtype of a query, checked before anything is copied or allocated."""
    if q.dim() != rank:
        shape = "[batch, q_heads, head_dim]" if rank == 3 else "[batch, q_heads, tokens, head_dim]"
        raise ValueError(f"q must be {shape}, got shape {tuple(q.shape)}")
    _check_float(q, "q")


def decode_attention(q, k, v=None, scale: Optional[float] = None) -> torch.Tensor:
    """Single-token decode attention with grouped KV heads.

    q: [B, Hq, D]; k, v: [B, Hkv, T, D] with Hq a multiple of Hkv (GQA/MQA; Hq == Hkv is
    MHA); returns out [B, Hq, D] = softmax(q k^T * scale) v, with query head i reading kv
    head i // (Hq // Hkv). scale defaults to 1/sqrt(D). Accumulation is fp32 whatever the
    storage dtype. ``k`` may instead be a :class:`QuantizedKV` (then ``v`` is left out): the
    kernel reads the quantized blocks, dequantizing each right before use (CPU).
    """
    if isinstance(k, QuantizedKV):
        if v is not None:
            raise TypeError("with a QuantizedKV, leave v out (it holds keys and values)")
        return _decode_quantized(q, k, scale)
    if v is None:
        raise TypeError("decode_attention needs v (or a QuantizedKV as k)")
    return decode_attention_segments(q, [(k, v, None)], scale=scale)


@dataclass(frozen=True)
class QuantizedKV:
    """Keys and values [B, Hkv, T, D] in kvloom's quantized block format (``kvloom/quant.h``:
    KIVI's scheme, keys per channel and values per token, ``bits`` of 8, 4 or 2, an fp16 minimum
    and step per group): ``blocks`` is uint8 [B, Hkv, ceil(T / block_size), block_bytes]."""

    blocks: torch.Tensor
    tokens: int
    head_dim: int
    bits: int
    block_size: int

    @property
    def nbytes(self) -> int:
        """Bytes held, scales included."""
        return self.blocks.numel()


def quantize_kv(k, v, bits: int = 4, block_size: int = 32) -> QuantizedKV:
    """k, v [B, Hkv, T, D] (any float dtype, finite, |x| <= 65504; D a multiple of 8) in the
    quantized block format."""
    k, v = as_tensor(k, "k"), as_tensor(v, "v")
    for t, what in ((k, "k"), (v, "v")):
        _check_float(t, what)
        if t.dim() != 4 or t.device.type != "cpu":
            raise ValueError(f"{what} must be a CPU tensor [batch, kv_heads, tokens, head_dim], got {tuple(t.shape)} on {t.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    B, H, T, D = k.shape
    nbytes = _core.quant_block_bytes(int(bits), int(block_size), int(D))  # validates bits, block size, D
    blocks = torch.empty(B, H, -(-T // block_size), nbytes, dtype=torch.uint8)
    _core.quantize_blocks(k.float().contiguous(), v.float().contiguous(), blocks, int(bits), int(block_size))
    return QuantizedKV(blocks, int(T), int(D), int(bits), int(block_size))


def dequantize_kv(qkv: QuantizedKV) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fp32 keys and values a :class:`QuantizedKV` stands for."""
    B, H = qkv.blocks.shape[:2]
    k = torch.empty(B, H, qkv.tokens, qkv.head_dim)
    v = torch.empty_like(k)
    _core.dequantize_blocks(qkv.blocks, k, v, qkv.bits, qkv.block_size)
    return k, v


def _decode_quantized(q, qkv: QuantizedKV, scale) -> torch.Tensor:
    q = as_tensor(q, "q")
    _check_q(q)
    if q.shape[2] != qkv.head_dim:
        raise ValueError(f"q head_dim {q.shape[2]} != the quantized K/V's head_dim {qkv.head_dim}")
    q = kernel_ready(q)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    _core.decode_attention_quantized(q, qkv.blocks, qkv.tokens, qkv.bits, qkv.block_size, out,
                                     0.0 if scale is None else _check_scale(scale))
    return out


def decode_attention_segments(q, segments: Sequence[Tuple[object, object, Optional[Sequence[int]]]],
                              scale: Optional[float] = None, inv_freq=None) -> torch.Tensor:
    """Decode attention over several key/value segments at once (Hogwild!-style views).

    Each segment is (k, v, delta) with k, v [B, Hkv, T_s, D] stored rotated at
    segment-local RoPE positions and delta a per-batch-row list of angle offsets
    (own_offset - segment_offset), or None for 0. The kernel rotates the query by delta
    per segment (angles delta * inv_freq, rotate-half convention) instead of re-rotating
    keys. inv_freq is the model's RoPE inverse frequencies [D_rot / 2].
    """
    q = as_tensor(q, "q")
    _check_q(q)  # every check before any copy (kernel_ready may copy)
    segs = []
    for i, seg in enumerate(segments):
        if not isinstance(seg, (tuple, list)) or len(seg) != 3:
            raise ValueError(f"segment {i} must be (k, v, delta)")
        k, v, delta = seg
        k, v = as_tensor(k, "k"), as_tensor(v, "v")
        for t, what in ((k, "k"), (v, "v")):
            _check_float(t, f"segment {i} {what}")
            if t.dim() != 4:
                raise ValueError(f"segment {i}: {what} must have 4 dimensions [batch, kv_heads, tokens, head_dim], got {tuple(t.shape)}")
            if t.shape[2] > _MAX_TOKENS:
                raise ValueError(f"segment {i} {what} has {t.shape[2]} tokens; at most {_MAX_TOKENS} are supported")
        if delta is not None:
            delta = [int(d) for d in (delta.tolist() if hasattr(delta, "tolist") else delta)]
        segs.append((k, v, delta))
    q = kernel_ready(q)
    segs = [(kernel_ready(k), kernel_ready(v), d) for k, v, d in segs]
    if inv_freq is not None:
        inv_freq = host(as_tensor(inv_freq, "inv_freq")).float().contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    use_stream(q.device)
    _core.decode_attention(q, segs, out, 0.0 if scale is None else _check_scale(scale), inv_freq)
    return out


def _check_scale(scale) -> float:
    scale = float(scale)
    if not scale > 0 or scale != scale or scale == float("inf"):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    return scale
