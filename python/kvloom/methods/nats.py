"""Training NAtS (Neural Attention Search) scorers on a CPU; the policy that uses them, the
scorer and the visibility rule are :mod:`kvloom.policies.nats` (re-exported here).

Training (:func:`train`) fits only the scorers, the model frozen: the loss is the MSE
between the final hidden states of the NAtS-masked model and of the full-attention model,
plus ``lam`` times the fraction of global tokens; types are sampled with hard
straight-through Gumbel-softmax (tau = 1); the first and last tokens are forced global. At
inference (``kvloom.Cache(model, policy=kvloom.NAtS())``) the C++ ``nats`` policy evicts by
the scorer's argmax types (first token global), and the prompt attends with the same mask.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from ..policies.nats import DEFAULT_SCORER, GLOBAL, LOCAL, SLIDING, HiddenHooks, Scorer, soft_visibility

__all__ = ["Scorer", "train", "masked_forward", "soft_visibility", "hard_types", "GLOBAL", "LOCAL", "SLIDING",
           "DEFAULT_SCORER"]


def hard_types(onehot: torch.Tensor) -> torch.Tensor:
    return onehot.argmax(-1)


# --- masked attention (training) -----------------------------------------------------------------
class _TrainState:
    def __init__(self, scorer: Scorer, window: int, hard: bool, generator: Optional[torch.Generator]):
        self.scorer = scorer
        self.window = window
        self.hard = hard  # argmax types instead of Gumbel samples
        self.gen = generator
        self.hidden: Dict[int, torch.Tensor] = {}
        self.global_frac: List[torch.Tensor] = []


_state: Optional[_TrainState] = None
ATTN_NAME = "kvloom_nats_train"


def _gumbel_onehot(logits: torch.Tensor, generator) -> torch.Tensor:
    u = torch.rand(logits.shape, generator=generator).clamp_(1e-9, 1 - 1e-9)
    y = torch.softmax(logits - torch.log(-torch.log(u)), -1)  # tau = 1
    hard = torch.nn.functional.one_hot(y.argmax(-1), 3).to(y.dtype)
    return hard + y - y.detach()  # straight-through


def _masked_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    st = _state
    layer = module.layer_idx
    logits = st.scorer.logits(layer, st.hidden.pop(layer))  # [B, H, T, 3]
    if st.hard:
        oh = torch.nn.functional.one_hot(logits.argmax(-1), 3).to(query.dtype)
    else:
        oh = _gumbel_onehot(logits, st.gen)
    forced = torch.zeros(3, dtype=oh.dtype)
    forced[GLOBAL] = 1
    oh = torch.cat([forced.expand_as(oh[..., :1, :]), oh[..., 1:-1, :], forced.expand_as(oh[..., -1:, :])], -2) \
        if oh.shape[-2] > 1 else forced.expand_as(oh)
    st.global_frac.append(oh[..., 1:-1, GLOBAL].mean() if oh.shape[-2] > 2 else oh[..., GLOBAL].mean())
    vis = soft_visibility(oh, st.window)  # [B, H, T, T]
    G = query.shape[1] // key.shape[1]
    if G > 1:
        key, value = key.repeat_interleave(G, 1), value.repeat_interleave(G, 1)
        vis = vis.repeat_interleave(G, 1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    s = (query @ key.transpose(-1, -2)) * scale
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        vis = vis * attention_mask.to(vis.dtype)
    w = torch.exp(s - s.amax(-1, keepdim=True)) * vis
    p = w / w.sum(-1, keepdim=True).clamp_min(1e-30)
    return (p @ value).transpose(1, 2).contiguous(), None


def _register_train_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _masked_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def masked_forward(model, scorer: Scorer, ids: torch.Tensor, *, hard: bool = True, window: Optional[int] = None,
                   generator: Optional[torch.Generator] = None):
    """Runs `model` on ids [B, T] with every attention layer NAtS-masked by `scorer`
    (argmax types when `hard`, Gumbel straight-through samples otherwise); returns
    (final hidden states [B, T, hidden], fraction of global tokens)."""
    global _state
    _register_train_attention()
    prev = model.config._attn_implementation
    _state = _TrainState(scorer, window or scorer.window, hard, generator)
    hooks = HiddenHooks(model, lambda layer, h: _state.hidden.__setitem__(layer, h))
    model.set_attn_implementation(ATTN_NAME)
    try:
        out = model.model(input_ids=ids, use_cache=False)
        frac = torch.stack(_state.global_frac).mean()
        return out.last_hidden_state, frac
    finally:
        hooks.remove()
        model.set_attn_implementation(prev)
        _state = None


def train(model, tokenizer, texts: Sequence[str], *, steps: int = 200, window: int = 64, lam: float = 0.05,
          lr: float = 1e-2, seq_len: int = 256, seed: int = 0, progress: bool = True,
          scorer: Optional[Scorer] = None) -> tuple:
    """Fits NAtS scorers for `model` (frozen) on `texts`; returns (scorer, history)."""
    from tqdm import tqdm

    from .convert import token_batches
    from ..hf import arch

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    geo = arch.geometry(model)
    hidden = arch.text_config(model).hidden_size
    scorer = scorer or Scorer(geo.n_layers, hidden, geo.n_kv_heads, window)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    data = token_batches(tokenizer, texts, seq_len)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(data.shape[0], generator=gen)
    opt = torch.optim.Adam(scorer.parameters(), lr=lr)
    hist = []
    bar = tqdm(range(steps), desc="nats train", unit="step", disable=not progress)
    for step in bar:
        ids = data[order[step % len(order)]][None]
        with torch.no_grad():
            target = model.model(input_ids=ids, use_cache=False).last_hidden_state
        out, frac = masked_forward(model, scorer, ids, hard=False, window=window, generator=gen)
        mse = torch.mean((out - target) ** 2)
        loss = mse + lam * frac
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist.append({"step": step, "mse": float(mse.detach()), "global_fraction": float(frac.detach())})
        bar.set_postfix_str(f"mse {hist[-1]['mse']:.4f}, global {hist[-1]['global_fraction']:.2f}")
    scorer.meta.update({"steps": steps, "window": window, "lam": lam, "lr": lr, "seq_len": seq_len, "seed": seed})
    return scorer.eval(), hist
