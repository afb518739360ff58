"""Dense entry points to kvloom's kernels, for benchmarking and for other serving stacks.

The functions take torch tensors (or anything exporting DLPack, e.g. numpy arrays) on the
CPU or on a CUDA device (all on the same one), in float32, float16 or bfloat16, and return a
tensor of the query's type on its device. CUDA work runs on torch's current stream.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from . import _core
from ._tensors import as_tensor, host, kernel_ready, use_stream

__all__ = ["decode_attention", "decode_attention_segments"]


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


def decode_attention(q, k, v, scale: Optional[float] = None) -> torch.Tensor:
    """Single-token decode attention with grouped KV heads.

    q: [B, Hq, D]; k, v: [B, Hkv, T, D] with Hq a multiple of Hkv (GQA/MQA; Hq == Hkv is
    MHA); returns out [B, Hq, D] = softmax(q k^T * scale) v, with query head i reading kv
    head i // (Hq // Hkv). scale defaults to 1/sqrt(D). Accumulation is fp32 whatever the
    storage dtype.
    """
    return decode_attention_segments(q, [(k, v, None)], scale=scale)


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
