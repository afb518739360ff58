"""FastGen (Ge et al., ICLR 2024, "Model Tells You What to Discard: Adaptive KV Cache
Compression for LLMs").

Each kv head is profiled once on the prompt (its query group's attention, aggregated):
kvloom picks the first of the nested hybrids special → +punctuation → +frequent → +local →
full whose kept keys hold at least ``recovery`` of the attention mass (averaged over the
prompt's queries), then applies it while decoding, freeing the rest for real. "frequent"
keeps the ``r_frequent`` fraction of tokens with the most accumulated attention; "local" the
tokens within ``r_local`` × prompt length of the current one. "special" are the tokenizer's
special ids, "punctuation" the vocab entries made only of punctuation and whitespace. Until
a head is profiled it keeps everything. The C++ side is the "fastgen" plan (one hybrid per
head) and the hybrid-recovery statistic.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import numpy as np
import torch

from .base import Policy, param, register

_PUNCT_CHARS = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~…–—“”‘’«»¿¡·")


def token_classes(tokenizer, vocab_size: int) -> torch.Tensor:
    """uint8 [vocab_size] class bits: 1 = a special token of the tokenizer, 2 = a vocab entry
    made only of punctuation and whitespace (and at least one punctuation mark)."""
    from .. import _core

    table = torch.zeros(vocab_size, dtype=torch.uint8)
    for i in getattr(tokenizer, "all_special_ids", []) or []:
        if 0 <= i < vocab_size:
            table[i] |= _core.CLASS_SPECIAL
    for i in range(min(vocab_size, len(tokenizer))):
        text = tokenizer.decode([i])
        if text and any(ch in _PUNCT_CHARS for ch in text) and all(ch in _PUNCT_CHARS or ch.isspace() for ch in text):
            table[i] |= _core.CLASS_PUNCT
    return table


def hybrid_recovery(kv, layer: int, q, seqs: Sequence[int], *, r_frequent: float, local_window: int,
                    scale: Optional[float] = None, accumulate: bool = False) -> np.ndarray:
    """FastGen's profiling statistic over a :class:`kvloom.KVCache`: [B, n_kv_heads, 4] attention
    mass (mean over q's queries [B, Hq, Tq, D] and each head's group, causal) kept by the
    hybrids special, +punct, +frequent, +local. With ``accumulate``, first adds q's attention
    to the scores as :meth:`KVCache.accumulate_attention` does, from the same pass over the
    probabilities: the same scores and masses as the two calls, at about the cost of one."""
    from .. import _core
    from .._tensors import as_tensor, use_stream
    from ..ops import _check_scale

    q = as_tensor(q, "q")
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, q_heads, tokens, head_dim], got shape {tuple(q.shape)}")
    if q.device.type == "cuda":
        q = q.contiguous()  # the statistic runs on the host from one copy of q
    use_stream(kv.device)
    return _core.hybrid_recovery(kv._c, layer, [int(s) for s in seqs], q, 0.0 if scale is None else _check_scale(scale),
                                 float(r_frequent), int(local_window), bool(accumulate))


@register
@dataclass(frozen=True)
class FastGen(Policy):
    """Per-head hybrids chosen by profiling the prompt (see the module docstring)."""

    name: ClassVar[str] = "fastgen"
    needs_scores: ClassVar[bool] = True
    scores_prompt: ClassVar[bool] = True
    needs_tokenizer: ClassVar[bool] = True
    HYBRIDS: ClassVar[tuple] = ("special", "special+punct", "special+punct+frequent", "special+punct+frequent+local",
                                "full")
    recovery: float = param(0.95, "attention mass (T) a head's hybrid must keep", lo=0.0, hi=1.0, lo_open=True)
    r_local: float = param(0.3, "local window, as a fraction of the prompt", lo=0.0, hi=1.0, lo_open=True)
    r_frequent: float = param(0.3, "frequent tokens kept, as a fraction of the tokens seen", lo=0.0, hi=1.0, lo_open=True)

    def local_window(self, prompt_len: int) -> int:
        return max(1, math.ceil(self.r_local * prompt_len))

    def choose(self, masses) -> int:
        """Index of the first hybrid whose recovered mass reaches `recovery` (4: full)."""
        for level, mass in enumerate(masses):
            if mass >= self.recovery - 1e-9:
                return level
        return 4

    def hybrid_plan(self, level: int, prompt_len: int):
        """The C++ plan of one head that chose hybrid `level` on a prompt of `prompt_len` tokens."""
        from .. import _core

        return _core.make_plan("fastgen", {"level": int(level), "local_window": self.local_window(prompt_len),
                                           "r_frequent": self.r_frequent})

    def token_classes(self, tokenizer, vocab_size: int):
        table = token_classes(tokenizer, vocab_size)
        if not bool((table & 1).any()):
            warnings.warn("the tokenizer has no special tokens: FastGen's 'special' hybrid keeps nothing "
                          "(heads fall through to the next hybrid)", stacklevel=3)
        return table

    def after_prompt(self, cache, layer: int, query, scaling) -> None:
        """Accumulates the prompt's attention and chooses each head's hybrid from it in one
        pass (``scores_prompt``), row by row (rows differ in prompt length when padded)."""
        kv = cache.kv
        for b, s in enumerate(cache.seqs):
            prompt_len = kv.length(layer, 0, s)  # the row's real prompt (padding already evicted)
            masses = hybrid_recovery(kv, layer, query[b:b + 1], [s], r_frequent=self.r_frequent,
                                     local_window=self.local_window(prompt_len), scale=scaling, accumulate=True)[0]
            for h in range(kv.n_kv_heads):
                kv.set_head_plan(layer, h, s, self.hybrid_plan(self.choose(masses[h]), prompt_len))

    @classmethod
    def example(cls, model=None):
        return cls(recovery=0.9)

    @classmethod
    def keep_all(cls, model=None):
        return cls(recovery=1.0)
