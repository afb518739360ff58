"""Architecture-level KV sharing: convert a pretrained model to fewer KV heads (MQA/GQA) or
to cross-layer attention (CLA), then uptrain briefly to recover quality.

- :func:`to_gqa` pools (mean), picks (first) or re-draws (random) the K/V projections of
  each group of kv heads and rewrites the config; the result is a plain transformers model
  (``save_pretrained`` / ``from_pretrained`` as usual).
- :func:`to_cla` makes groups of ``factor`` adjacent layers share the KV of the group's
  first layer (the owner): the other layers lose their K/V projections and attend with
  their own queries over the owner's keys and values. The config gets ``kvloom_cla_factor``;
  reload a saved CLA model with :func:`load`. ``kvloom.Cache`` honours it (readers hold no
  KV: ``memory_bytes()`` falls by the factor).
- :func:`uptrain` is a short next-token-loss training loop on CPU with a progress bar.

Llama-family models (Llama, SmolLM2/3, Mistral, Qwen2, Qwen3) are supported.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from ..hf.arch import cla_owner, layer_store  # the config side of CLA lives with the architectures

__all__ = ["to_gqa", "to_cla", "load", "uptrain", "perplexity", "token_batches", "cla_owner", "layer_store",
           "SharedKVAttention", "SUPPORTED"]

SUPPORTED = ("llama", "smollm3", "mistral", "qwen2", "qwen3")


def _config(model):
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise TypeError("expected a transformers model (with a .config)")
    return cfg


def _attn_modules(model) -> List[nn.Module]:
    cfg = _config(model)
    if cfg.model_type not in SUPPORTED:
        raise NotImplementedError(f"kvloom.convert supports {', '.join(SUPPORTED)}; got model_type "
                                  f"{cfg.model_type!r}")
    layers = model.model.layers
    return [layer.self_attn for layer in layers]


# --- MQA / GQA ---------------------------------------------------------------------------------
def pooled_kv_weight(weight: torch.Tensor, old_heads: int, new_heads: int, head_dim: int, init: str,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A K or V projection's weight [old_heads * head_dim, ...] (or bias [old_heads *
    head_dim]) turned into new_heads heads: each new head from its group of old_heads /
    new_heads consecutive heads, by mean, first, or random (same std as the original)."""
    r = old_heads // new_heads
    w = weight.detach().reshape(new_heads, r, head_dim, *weight.shape[1:])
    if init == "mean":
        return w.mean(dim=1).reshape(new_heads * head_dim, *weight.shape[1:]).clone()
    if init == "first":
        return w[:, 0].reshape(new_heads * head_dim, *weight.shape[1:]).clone()
    if init == "random":
        std = float(weight.detach().float().std()) if weight.numel() > 1 else 0.02
        out = torch.randn(new_heads * head_dim, *weight.shape[1:], generator=generator, dtype=torch.float32) * std
        return out.to(weight.dtype)
    raise ValueError(f"init must be 'mean', 'first' or 'random', got {init!r}")


def to_gqa(model, num_kv_heads: int, init: str = "mean", seed: int = 0):
    """Converts `model` in place to `num_kv_heads` KV heads and returns it.

    Query head i reads kv head ``i // (num_heads / num_kv_heads)`` (transformers' GQA
    layout), so each new kv head replaces a group of consecutive old ones. ``num_kv_heads=1``
    is MQA. The model is untouched if anything is wrong with the arguments.
    """
    cfg = _config(model)
    attns = _attn_modules(model)
    if init not in ("mean", "first", "random"):
        raise ValueError(f"init must be 'mean', 'first' or 'random', got {init!r}")
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    num_kv_heads = int(num_kv_heads)
    if num_kv_heads < 1 or hq % num_kv_heads != 0:
        raise ValueError(f"num_kv_heads={num_kv_heads} must divide the {hq} query heads")
    if hkv % num_kv_heads != 0:
        raise ValueError(f"num_kv_heads={num_kv_heads} must divide the model's {hkv} kv heads (each new head "
                         "replaces a group of old ones)")
    if any(isinstance(a, SharedKVAttention) for a in attns):
        raise ValueError("convert to GQA before CLA (this model already shares KV across layers)")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    gen = torch.Generator().manual_seed(seed)
    new = []
    for a in attns:  # compute everything first: nothing changes if this fails
        proj = {}
        for name in ("k_proj", "v_proj"):
            lin = getattr(a, name)
            w = pooled_kv_weight(lin.weight, hkv, num_kv_heads, head_dim, init, gen)
            b = None if lin.bias is None else pooled_kv_weight(lin.bias, hkv, num_kv_heads, head_dim, init, gen)
            proj[name] = (w, b)
        new.append(proj)
    for a, proj in zip(attns, new):
        for name, (w, b) in proj.items():
            lin = getattr(a, name)
            repl = nn.Linear(lin.in_features, w.shape[0], bias=b is not None, dtype=lin.weight.dtype)
            with torch.no_grad():
                repl.weight.copy_(w)
                if b is not None:
                    repl.bias.copy_(b)
            setattr(a, name, repl)
        a.num_key_value_groups = hq // num_kv_heads
    cfg.num_key_value_heads = num_kv_heads
    return model


# --- CLA ---------------------------------------------------------------------------------------


class SharedKVAttention(nn.Module):
    """A Llama-family attention layer in a CLA group. The owner computes K/V (and caches
    them); a reader has no K/V projections and attends with its own queries over the K/V
    its owner produced in the same forward (or, with a ``kvloom.Cache``, over the owner's
    store)."""

    def __init__(self, orig: nn.Module, owner: int, state: Dict[int, tuple]):
        super().__init__()
        self.config = orig.config
        self.layer_idx = orig.layer_idx
        self.head_dim = orig.head_dim
        self.num_key_value_groups = orig.num_key_value_groups
        self.scaling = orig.scaling
        self.attention_dropout = orig.attention_dropout
        self.is_causal = True
        self.sliding_window = getattr(orig, "sliding_window", None)
        self.owner = owner
        self.is_owner = owner == orig.layer_idx
        self.q_proj, self.o_proj = orig.q_proj, orig.o_proj
        self.q_norm = getattr(orig, "q_norm", None)
        self.k_norm = getattr(orig, "k_norm", None) if self.is_owner else None
        if self.is_owner:
            self.k_proj, self.v_proj = orig.k_proj, orig.v_proj
        self._state = state  # shared by the group: the owner's K/V of the current forward

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, past_key_values=None,
                **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.llama.modeling_llama import eager_attention_forward, rotate_half

        from ..hf.compat import passed_cache

        # transformers >= 5.24 hands the cache over as cache=, older releases as past_key_values=
        cache = passed_cache(cache, past_key_values)

        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = q.transpose(1, 2)
        cos, sin = position_embeddings
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        if self.is_owner:
            k = self.k_proj(hidden_states).view(hidden_shape)
            if self.k_norm is not None:
                k = self.k_norm(k)
            k = k.transpose(1, 2)
            v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
            k = k * cos + rotate_half(k) * sin
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx)
            self._state[self.owner] = (k, v)
        else:
            if self.owner not in self._state:
                raise RuntimeError(f"layer {self.layer_idx} reads layer {self.owner}'s KV, which did not run first")
            k, v = self._state[self.owner]
            read = getattr(cache, "read_shared", None)
            if read is not None:
                k, v = read(self.layer_idx, k, v, q.shape[2])
        extra = {"sliding_window": self.sliding_window} if self.sliding_window is not None else {}
        impl = self.config._attn_implementation
        if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)
        else:  # transformers 5.0
            attention_interface = eager_attention_forward if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]
        out, weights = attention_interface(self, q, k, v, attention_mask,
                                           dropout=0.0 if not self.training else self.attention_dropout,
                                           scaling=self.scaling, **extra, **kwargs)
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights


def to_cla(model, factor: int = 2):
    """Converts `model` in place to cross-layer attention with groups of `factor` adjacent
    layers (the first of each group owns the KV) and returns it. Readers' K/V projections are
    dropped; ``config.kvloom_cla_factor`` records the sharing."""
    cfg = _config(model)
    attns = _attn_modules(model)
    n = len(attns)
    if isinstance(factor, bool) or not isinstance(factor, int) or not 1 <= factor <= n:
        raise ValueError(f"factor must be an integer in [1, {n}] (the model has {n} layers), got {factor!r}")
    if any(isinstance(a, SharedKVAttention) for a in attns):
        raise ValueError("this model already shares KV across layers")
    if factor == 1:
        return model
    state: Dict[int, tuple] = {}
    for i, layer in enumerate(model.model.layers):
        layer.self_attn = SharedKVAttention(layer.self_attn, cla_owner(i, factor), state)
    cfg.kvloom_cla_factor = factor
    return model


def load(path: str, **kw):
    """``AutoModelForCausalLM.from_pretrained(path)`` that re-applies a saved CLA conversion
    (``kvloom_cla_factor`` in the config); for other models it is plain from_pretrained."""
    import warnings

    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    factor = int(getattr(cfg, "kvloom_cla_factor", 1) or 1)
    if factor == 1:
        return AutoModelForCausalLM.from_pretrained(path, **kw)
    with warnings.catch_warnings():  # readers' K/V projections are missing on purpose
        warnings.simplefilter("ignore")
        from transformers.utils import logging

        level = logging.get_verbosity()
        logging.set_verbosity_error()
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kw)
        finally:
            logging.set_verbosity(level)
    delattr(model.config, "kvloom_cla_factor")
    return to_cla(model, factor)


# --- uptraining --------------------------------------------------------------------------------
def token_batches(tokenizer, texts: Iterable[str], seq_len: int) -> torch.Tensor:
    """The texts tokenised, joined and cut into [n, seq_len] rows."""
    ids: List[int] = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id or 0]
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"the texts hold {len(ids)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def uptrain(model, tokenizer, texts: Sequence[str], steps: int = 100, lr: float = 1e-4, *, seq_len: int = 256,
            batch_size: int = 2, weight_decay: float = 0.0, warmup: int = 10, seed: int = 0,
            progress: bool = True) -> List[float]:
    """Continued training (next-token loss, AdamW, linear warm-up then cosine decay) of all
    parameters on CPU; returns the loss per step. `steps * batch_size * seq_len` tokens are
    seen (cycling through the texts)."""
    from tqdm import tqdm

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    data = token_batches(tokenizer, texts, seq_len)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(data.shape[0], generator=gen)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def schedule(step):
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    was_training = model.training
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="uptrain", unit="step", disable=not progress)
    try:
        for step in bar:
            idx = torch.stack([order[(step * batch_size + j) % len(order)] for j in range(batch_size)])
            batch = data[idx]
            out = model(input_ids=batch, labels=batch, use_cache=False)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(out.loss.detach()))
            bar.set_postfix_str(f"loss {losses[-1]:.3f}")
    finally:
        model.train(was_training)
    return losses


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int = 1024) -> float:
    """Perplexity of ids [1, n] in non-overlapping windows (plain forward, no cache)."""
    nll, count = 0.0, 0
    for s in range(0, ids.shape[1] - 1, window):
        chunk = ids[:, s:s + window + 1]
        if chunk.shape[1] < 2:
            break
        out = model(input_ids=chunk[:, :-1], use_cache=False)
        logp = torch.log_softmax(out.logits.float(), -1)
        nll -= logp.gather(-1, chunk[:, 1:, None]).sum().item()
        count += chunk.shape[1] - 1
    return math.exp(nll / count)
