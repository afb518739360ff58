"""NAtS (Deng & Lindauer, 2025, "Neural Attention Search"): learned token types.

A small scorer per attention layer, ``Linear(hidden, n_kv_heads * 3)`` on the layer's input
hidden states, types every token for every kv head:

- **global** (0): kept for all later queries;
- **local** (1): kept until the next global token of that head has been attended;
- **sliding** (2): kept for the ``window`` queries from its own position on.

At inference the types are the scorer's argmax (the first token is global); the C++ "nats"
plan frees what the types allow after every step, and the prompt attends with the same
visibility rules. Training the scorer (model frozen) is :mod:`kvloom.methods.nats`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, Optional

import torch
from torch import nn

from .base import Policy, param, register

GLOBAL, LOCAL, SLIDING = 0, 1, 2
DEFAULT_SCORER = Path(__file__).resolve().parents[1] / "data" / "nats_smollm2.pt"


class Scorer(nn.Module):
    """One ``Linear(hidden, n_kv_heads * 3)`` per attention layer."""

    def __init__(self, n_layers: int, hidden: int, n_kv_heads: int, window: int = 64, global_bias: float = 3.0):
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.n_kv_heads = n_kv_heads
        self.window = int(window)
        self.layers = nn.ModuleList(nn.Linear(hidden, n_kv_heads * 3) for _ in range(n_layers))
        with torch.no_grad():  # start close to full attention: mostly global
            for lin in self.layers:
                lin.weight.mul_(0.1)
                lin.bias.zero_()
                lin.bias.view(n_kv_heads, 3)[:, GLOBAL] = global_bias
        self.meta: Dict[str, object] = {}

    @classmethod
    def constant(cls, n_layers: int, hidden: int, n_kv_heads: int, kind: int, window: int = 8) -> "Scorer":
        """A scorer that types every token `kind` (GLOBAL, LOCAL or SLIDING) whatever the input."""
        sc = cls(n_layers, hidden, n_kv_heads, window=window)
        bias = torch.zeros(3)
        bias[kind] = 10.0
        with torch.no_grad():
            for lin in sc.layers:
                lin.weight.zero_()
                lin.bias.copy_(bias.repeat(n_kv_heads))
        return sc

    def logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """[B, H, T, 3] type logits from hidden states [B, T, hidden]."""
        B, T, _ = hidden.shape
        out = self.layers[layer](hidden.to(self.layers[layer].weight.dtype))
        return out.view(B, T, self.n_kv_heads, 3).permute(0, 2, 1, 3)

    @torch.no_grad()
    def types(self, layer: int, hidden: torch.Tensor, first_ord: int = 0) -> torch.Tensor:
        """uint8 [B, H, T] argmax types; the sequence's first token (ord 0) is global."""
        t = self.logits(layer, hidden).argmax(-1).to(torch.uint8)
        if first_ord == 0 and t.shape[-1] > 0:
            t[..., 0] = GLOBAL
        return t

    def save(self, path, **meta) -> None:
        self.meta.update(meta)
        torch.save({"state": {k: v.half() for k, v in self.state_dict().items()}, "n_layers": len(self.layers),
                    "hidden": self.layers[0].in_features, "n_kv_heads": self.n_kv_heads, "window": self.window,
                    "meta": self.meta}, path)

    @classmethod
    def load(cls, path=None) -> "Scorer":
        """A saved scorer (default: the one shipped for SmolLM2-135M-Instruct)."""
        path = Path(path) if path is not None else DEFAULT_SCORER
        if not path.exists():
            raise FileNotFoundError(f"no NAtS scorer at {path}; train one with `kvloom nats train`")
        blob = torch.load(path, map_location="cpu", weights_only=False)
        s = cls(blob["n_layers"], blob["hidden"], blob["n_kv_heads"], blob["window"])
        s.load_state_dict({k: v.float() for k, v in blob["state"].items()})
        s.meta = dict(blob.get("meta", {}))
        s.source = None if path == DEFAULT_SCORER else str(path.resolve())  # what snapshots record
        return s.eval()

    def check_model(self, model) -> None:
        from ..hf import arch

        geo = arch.geometry(model)
        hidden = arch.text_config(model).hidden_size
        if (geo.n_layers, geo.n_kv_heads, hidden) != (len(self.layers), self.n_kv_heads, self.layers[0].in_features):
            raise ValueError(f"this NAtS scorer was made for {len(self.layers)} layers x {self.n_kv_heads} kv heads, "
                             f"hidden {self.layers[0].in_features}; the model has {geo.n_layers} x {geo.n_kv_heads}, "
                             f"hidden {hidden}")


def soft_visibility(onehot: torch.Tensor, window: int) -> torch.Tensor:
    """Differentiable NAtS mask from one-hot (or straight-through) types [..., T, 3]:
    [..., T(query), T(key)] with 1 where the query may attend the key. Equal to
    ``kvloom.reference.nats_visible`` on hard one-hots; gradients reach every type."""
    g, loc, sl = onehot[..., GLOBAL], onehot[..., LOCAL], onehot[..., SLIDING]
    T = onehot.shape[-2]
    C = torch.cumsum(g, -1)  # globals at or before each position
    before = C - g  # globals strictly before i
    i = torch.arange(T, device=onehot.device)
    between = before[..., :, None] - C[..., None, :]  # globals k with j < k < i (for j < i)
    local_vis = loc[..., None, :] * torch.relu(1 - between)
    slide = ((i[:, None] - i[None, :]) < window).to(onehot.dtype)
    vis = g[..., None, :] + local_vis + sl[..., None, :] * slide
    causal = (i[None, :] < i[:, None]).to(onehot.dtype)
    eye = torch.eye(T, dtype=onehot.dtype, device=onehot.device)
    return vis * causal + eye


class HiddenHooks:
    """Forward pre-hooks that hand each attention layer's input hidden states to `sink`."""

    def __init__(self, model, sink):
        from ..hf.arch import attention_modules

        self.handles = []
        for m in attention_modules(model):
            def hook(mod, args, kwargs, _sink=sink):
                h = kwargs.get("hidden_states", args[0] if args else None)
                _sink(mod.layer_idx, h)
            self.handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


class _Attached:
    """A cache's NAtS state on the transformers path: the hidden states its hooks saw and the
    types assigned per layer in the current forward."""

    def __init__(self, model):
        self.hidden: Dict[int, torch.Tensor] = {}
        self.types: Dict[int, torch.Tensor] = {}
        self.hooks = HiddenHooks(model, self.hidden.__setitem__)

    def remove(self):
        self.hooks.remove()


@register
@dataclass(frozen=True, eq=False)
class NAtS(Policy):
    """Token types from a learned scorer (default: the one shipped for SmolLM2-135M-Instruct)."""

    name: ClassVar[str] = "nats"
    scorer: Any = param(None, "a trained scorer: path (default: the shipped one) or a kvloom.nats.Scorer", kind=str)
    window: Optional[int] = param(None, "sliding-window length (default: the scorer's training window)", lo=1,
                                  kind=int)

    def check(self) -> None:
        sc = self.scorer if isinstance(self.scorer, Scorer) else Scorer.load(self.scorer)
        object.__setattr__(self, "scorer", sc)
        object.__setattr__(self, "window", int(self.window if self.window is not None else sc.window))

    @property
    def label(self) -> str:
        return f"nats(window={self.window})"

    def saved_values(self):
        src = getattr(self.scorer, "source", False)
        if src is False:
            raise ValueError("NAtS with an in-memory scorer cannot be written to a snapshot: save the scorer "
                             "(Scorer.save(path)) and make the policy with NAtS(scorer=path)")
        return {"scorer": src, "window": self.window}

    def plan(self):
        from .. import _core

        return _core.make_plan("nats", {"window": self.window})

    def attach(self, cache, model):
        self.scorer.check_model(model)
        self.scorer.to(next(model.parameters()).device)  # types are computed where the hidden states are
        return _Attached(model)

    def append_classes(self, cache, layer: int, batch: int, n: int):
        st = cache.policy_state
        h = st.hidden.pop(layer, None)
        if h is None or h.shape[0] != batch or h.shape[1] < n:
            raise RuntimeError("NAtS needs the attention layer's input hidden states (the cache's hooks did not see "
                               "this forward); is the cache used with the model it was built for?")
        first = cache.layers[layer].cumulative_length
        # the scorer types every kv head of the model; under tensor parallelism this rank keeps its own
        t = cache.local_heads(self.scorer.types(layer, h[:, -n:], first_ord=first)).contiguous()
        st.types[layer] = t
        return t

    def prompt_attention(self, cache, layer: int, query, key, value, attention_mask, scaling):
        """The prompt attends with the NAtS visibility rules of the types just assigned."""
        st = cache.policy_state
        types = st.types.get(layer, st.types.get(cache.owner(layer)))  # a CLA reader uses its owner's types
        types = types.long()  # [B, Hkv, T]
        vis = soft_visibility(torch.nn.functional.one_hot(types, 3).float(), self.window) > 0.5  # [B, Hkv, T, T]
        G = query.shape[1] // key.shape[1]
        vis = vis.repeat_interleave(G, dim=1)
        if attention_mask is not None:
            m = attention_mask[:, :, :, -types.shape[-1]:]
            if m.dtype != torch.bool:
                m = m > torch.finfo(m.dtype).min / 2
            vis = vis & m
        vis = vis | (~vis.any(-1, keepdim=True) & (torch.arange(vis.shape[-1], device=vis.device) == 0))  # no NaN rows
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=vis, scale=scaling,
                                                               enable_gqa=G > 1)
        return out.transpose(1, 2).contiguous()

    @classmethod
    def _for(cls, model, kind: int, window: int):
        from ..hf import arch

        geo = arch.geometry(model)
        return cls(Scorer.constant(geo.n_layers, arch.text_config(model).hidden_size, geo.n_kv_heads, kind, window))

    @classmethod
    def example(cls, model=None):
        return cls() if model is None else cls._for(model, SLIDING, 4)

    @classmethod
    def keep_all(cls, model=None):
        return None if model is None else cls._for(model, GLOBAL, 4)
