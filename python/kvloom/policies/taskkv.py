"""Task-KV (He et al., 2025): semantic separation of heads.

Per layer, over an observation window of the last ``window`` prompt queries: each kv head's
column-mean attention C, its top-``top_t`` tokens I and its semantic vector v = C[I]·V[I];
the layer centre is the mean vector. Heterogeneous heads (the f(r) farthest from the centre,
f falling linearly from n·beta at the first layer to ``m`` at the last, plus the single
nearest head) keep the full cache; the others keep ``sinks`` first tokens, ``recent`` newest
tokens and the middle activations (highest max-pooled C, kernel ``pool``) up to ``budget`` ×
prompt length tokens. If the budget is smaller than sinks + recent, those heads keep sinks +
recent only. The C++ side is the "keep_set" plan.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Policy, param, register


@register
@dataclass(frozen=True)
class TaskKV(Policy):
    """Heterogeneous heads keep everything; the others sinks + recent + middle activations."""

    name: ClassVar[str] = "taskkv"
    aliases: ClassVar[tuple] = ("task-kv",)
    beta: float = param(0.25, "heterogeneous heads at the first layer, as a fraction of the heads", lo=0.0)
    m: int = param(4, "heterogeneous heads at the last layer", lo=0)
    sinks: int = param(16, "first tokens kept by the other heads", lo=0)
    recent: int = param(256, "newest tokens kept by the other heads", lo=0)
    budget: float = param(0.4, "tokens kept by the other heads, as a fraction of the prompt", lo=0.0, hi=1.0,
                          lo_open=True)
    window: int = param(32, "observation window: the prompt's last queries", lo=1)
    top_t: int = param(256, "tokens in a head's semantic vector", lo=1)
    pool: int = param(7, "max-pooling kernel over the column means", lo=1)

    def decide(self, col_means, values, layer: int, n_layers: int):
        """The layer's split from each kv head's observation-window column means C [T] and
        values [T, D] (both in prompt order): (heterogeneous heads, {head: middle positions})."""
        hetero = self.heterogeneous(self.semantic_vectors(col_means, values), layer, n_layers)
        return hetero, {h: self.middle(C) for h, C in enumerate(col_means) if h not in hetero}

    def semantic_vectors(self, col_means, values) -> torch.Tensor:
        """[heads, D] float64: each head's C[I]·V[I] over its top-``top_t`` tokens I."""
        vecs = []
        for C, v in zip(col_means, values):
            top = torch.topk(C, min(self.top_t, C.numel())).indices
            vecs.append((C[top, None].double() * v.double()[top]).sum(0))
        return torch.stack(vecs)

    def heterogeneous(self, vecs: torch.Tensor, layer: int, n_layers: int) -> list:
        """The heads (rows of the layer's semantic vectors) that keep everything: the f(r)
        farthest from the layer centre and the single nearest one."""
        dist = (vecs - vecs.mean(0)).norm(dim=1)
        order = torch.argsort(dist, descending=True).tolist()
        return sorted(set(order[: self.n_heterogeneous(layer, n_layers, len(vecs))]) | {order[-1]})

    def middle(self, C) -> list:
        """A non-heterogeneous head's middle activations: prompt positions of the highest
        max-pooled column means between the sinks and the recent tokens, up to the budget."""
        T = C.numel()
        k_mid = max(0, math.ceil(self.budget * T) - self.sinks - self.recent)
        lo, hi = self.sinks, T - self.recent
        if k_mid == 0 or hi <= lo:
            return []
        pooled = torch.nn.functional.max_pool1d(C[None, None].float(), self.pool, stride=1,
                                                padding=self.pool // 2)[0, 0][:T]
        cand = pooled[lo:hi]
        return sorted((torch.topk(cand, min(k_mid, cand.numel())).indices + lo).tolist())

    def n_heterogeneous(self, layer: int, n_layers: int, n_heads: int) -> int:
        """f(r): n·beta at the first layer, falling linearly to m at the last."""
        start = n_heads * self.beta
        f = start if n_layers == 1 else start + (self.m - start) * layer / (n_layers - 1)
        return max(0, min(n_heads, int(round(f))))

    def after_prompt(self, cache, layer: int, query, scaling) -> None:
        """The observation window's column means come from the C++ cache (attention of the
        prompt's last queries accumulated into the slots' scores); then the layer's heads are
        split by their semantic vectors and each gets its keep-set plan."""
        from .. import _core

        if query.shape[2] < 2:
            return
        kv = cache.kv
        Hkv = kv.n_kv_heads
        G = query.shape[1] // Hkv
        for b, s in enumerate(cache.seqs):
            T = kv.length(layer, 0, s)  # the row's real prompt (padding already evicted)
            L = min(self.window, T)
            kv.accumulate_attention(layer, query[b:b + 1, :, -L:], [s], scale=scaling)
            col_means, values = [], []
            for h in range(Hkv):
                _, v, ords, _ = kv.gather(layer, h, s, dtype=torch.float32)
                _, slot_ords, _ = kv.slots(layer, h, s)
                by_ord = dict(zip(slot_ords.tolist(), (kv.scores(layer, h, s) / (G * L)).tolist()))
                col_means.append(torch.tensor([by_ord[o] for o in ords.tolist()]))
                values.append(v.cpu())  # the split is decided on the host (once per prompt)
            offset = kv.seq_length(s) - T  # prompt ords start after evicted left padding
            # the layer centre spans every kv head of the model: under tensor parallelism the
            # ranks exchange their heads' semantic vectors and each decides as one process would
            vecs = cache.all_heads(self.semantic_vectors(col_means, values))
            hetero = self.heterogeneous(vecs, layer, cache.geometry.n_layers)
            for h in range(Hkv):
                if cache.head_offset + h in hetero:
                    plan = _core.make_plan("keep_set", {"label": "taskkv:heterogeneous", "keep_all": 1})
                else:
                    plan = _core.make_plan("keep_set", {"label": "taskkv:sinks+recent+middle", "sinks": self.sinks + offset,
                                                        "recent": self.recent,
                                                        "ords": [o + offset for o in self.middle(col_means[h])]})
                kv.set_head_plan(layer, h, s, plan)

    @classmethod
    def example(cls, model=None):
        return cls(beta=0.0, m=0, sinks=2, recent=4, budget=0.3)

    @classmethod
    def keep_all(cls, model=None):
        return cls(recent=1 << 30)
