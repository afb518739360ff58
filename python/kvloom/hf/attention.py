"""kvloom's attention function for transformers' AttentionInterface (name ``"kvloom"``).

Decode steps (one new token per row) run kvloom's C++ kernel over the cache's head stores.
A prompt on an empty cache runs transformers' own SDPA path unchanged (so the ``Full``
policy reproduces ``DynamicCache`` + sdpa); a prompt chunk on a non-empty cache (chunked
prefill, a continued conversation) attends over the live cached tokens plus the chunk with
kvloom's chunk attention (``KVCache.chunk_attention``). After attention, left-padding tokens
are evicted and each head's policy runs: the new tokens attend before anything is evicted. In
a decode step of a policy that ranks by accumulated attention, the policies of all layers run
after the forward instead (see ``kvloom.Cache``): on CUDA the scores then reach the host once
per step.
"""
from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .cache import _take_active


def kvloom_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             sliding_window=None, softcap=None, **kwargs):
    cache = _take_active(getattr(module, "layer_idx", -1), key)
    if cache is None:
        # no kvloom.Cache in this forward (use_cache=False, training, another Cache class):
        # plain SDPA is the right answer and costs nothing extra
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, softcap=softcap, **kwargs)
    if id(module) not in cache._attn_ids:
        raise ValueError("this kvloom.Cache was built for another model; make one per model")
    if softcap is not None:
        raise NotImplementedError("attention soft-capping is not supported by kvloom")
    if dropout and module.training:
        raise NotImplementedError("attention dropout (training) is not supported with a kvloom.Cache")
    layer = module.layer_idx
    B, Hq, q_len, D = query.shape
    past = cache.layers[layer].cumulative_length - q_len
    policy = cache.policy
    out = None
    accumulated = False  # the policy's accumulated attention already added by the decode pass
    if q_len == 1 and past > 0:
        targets, inv_freq = cache._decode_targets(layer)  # sequences, or segment views (Hogwild!)
        accumulated = policy.needs_scores and inv_freq is None and cache.owns(layer)
        out = cache.kv.attend(layer, query[:, :, 0, :], targets, scale=scaling, inv_freq=inv_freq,
                              accumulate=accumulated)  # [B, Hq, D]
        out = out.unsqueeze(1)  # [B, 1, Hq, D]
    elif past == 0:
        if q_len > 1 and cache.layers[layer].window is None:
            out = policy.prompt_attention(cache, layer, query, key, value, attention_mask, scaling)
        if out is None:
            out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling,
                                            sliding_window=sliding_window, **kwargs)
    else:  # a chunk over a non-empty cache
        mask = None if attention_mask is None else attention_mask[:, 0]
        out = cache.kv.chunk_attention(layer, query, cache.seqs, mask=mask, scale=scaling).transpose(1, 2).contiguous()
    if not cache.owns(layer):  # a CLA reader: its owner layer already did the bookkeeping
        return out, None
    if q_len > 1 and attention_mask is not None:
        _evict_invisible_new_tokens(cache, layer, attention_mask, past, q_len)
    profile = past == 0 and cache.layers[layer].window is None
    if policy.needs_scores and not accumulated and not (profile and policy.scores_prompt):
        cache.kv.accumulate_attention(layer, query, cache.seqs, scale=scaling)
    if profile:
        policy.after_prompt(cache, layer, query, scaling)
    full = _full_tokens(cache, attention_mask)
    if accumulated and cache._defer_policies:  # runs after the forward (kvloom.Cache._run_deferred_policies)
        cache._deferred_policy.append((layer, full))
        return out, None
    for b, s in enumerate(cache.seqs):
        cache.kv.apply_policy(layer, s, full_tokens=None if full is None else full[b])
    return out, None


def _full_tokens(cache, attention_mask):
    """Per row, the tokens ``Full`` holds in this layer (what the last query may see: padding
    and, on sliding layers, what left the window excluded), which sizes a ``kv_budget``; None
    without a budget or a mask (then every token counts)."""
    if attention_mask is None or cache.kv.kv_budget is None:
        return None
    return _visible_to_last_query(attention_mask, attention_mask.shape[-1]).sum(-1).tolist()


def _visible_to_last_query(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """[B, q_len] bool: which of this chunk's tokens the chunk's last query may see."""
    m = attention_mask[:, 0, -1, -q_len:]
    if m.dtype != torch.bool:  # additive float mask
        m = m > torch.finfo(m.dtype).min / 2
    return m


def _evict_invisible_new_tokens(cache, layer: int, attention_mask: torch.Tensor, past: int, q_len: int) -> None:
    """Left padding (and, on sliding layers, tokens already out of the window) is never
    seen again: free it now."""
    vis = _visible_to_last_query(attention_mask, q_len)
    kv = cache.kv
    for b, s in enumerate(cache.seqs):
        hidden = (~vis[b]).nonzero().flatten()
        if hidden.numel() == 0:
            continue
        ords = set((hidden + past).tolist())
        for h in range(kv.n_kv_heads):
            slots, o, _ = kv.slots(layer, h, s)
            sel = [int(sl) for sl, oo in zip(slots, o) if int(oo) in ords]
            if sel:
                kv.evict(layer, h, s, sel)
