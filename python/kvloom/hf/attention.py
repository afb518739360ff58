"""kvloom's attention function for transformers' AttentionInterface (name ``"kvloom"``).

Decode steps (one new token per row) run kvloom's C++ kernel over the cache's head stores.
A prompt on an empty cache runs transformers' own SDPA path unchanged (so the ``Full``
policy reproduces ``DynamicCache`` + sdpa); a prompt chunk on a non-empty cache (chunked
prefill, a continued conversation) attends over the live cached tokens plus the chunk with
kvloom's C++ chunk attention (on CUDA caches: the live keys gathered, torch SDPA). After attention, left-padding tokens are evicted and each head's policy runs:
the new tokens attend before anything is evicted.
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
    if q_len == 1 and past > 0:
        targets, inv_freq = cache._decode_targets(layer)  # sequences, or segment views (Hogwild!)
        out = cache.kv.attend(layer, query[:, :, 0, :], targets, scale=scaling, inv_freq=inv_freq)  # [B, Hq, D]
        out = out.unsqueeze(1)  # [B, 1, Hq, D]
    elif past == 0:
        if q_len > 1 and cache.layers[layer].window is None:
            out = policy.prompt_attention(cache, layer, query, key, value, attention_mask, scaling)
        if out is None:
            out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling,
                                            sliding_window=sliding_window, **kwargs)
    elif cache.kv.device.type == "cpu":  # a chunk over a non-empty cache: the C++ chunk attention
        mask = None if attention_mask is None else attention_mask[:, 0]
        out = cache.kv.chunk_attention(layer, query, cache.seqs, mask=mask, scale=scaling).transpose(1, 2).contiguous()
    else:  # on CUDA: the live keys gathered per head, torch SDPA
        out = _chunk_over_cache(cache, layer, query, attention_mask, past, scaling)
    if not cache.owns(layer):  # a CLA reader: its owner layer already did the bookkeeping
        return out, None
    if q_len > 1 and attention_mask is not None:
        _evict_invisible_new_tokens(cache, layer, attention_mask, past, q_len)
    if policy.needs_scores:
        cache.kv.accumulate_attention(layer, query, cache.seqs, scale=scaling)
    if past == 0 and cache.layers[layer].window is None:
        policy.after_prompt(cache, layer, query, scaling)
    full = _full_tokens(cache, attention_mask)
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


def _chunk_over_cache(cache, layer: int, query: torch.Tensor, attention_mask, past: int, scaling):
    """Attention of a multi-token chunk over each head's live tokens (the chunk's own tokens
    are already appended). Heads may hold different tokens, so keys are padded per head."""
    B, Hq, q_len, D = query.shape
    kv = cache.kv
    Hkv = kv.n_kv_heads
    G = Hq // Hkv
    per = [[kv.gather(layer, h, s) for h in range(Hkv)] for s in cache.seqs]
    L = max(1, max(g[0].shape[0] for row in per for g in row))
    K = query.new_zeros(B, Hkv, L, D)
    V = query.new_zeros(B, Hkv, L, D)
    dev = query.device
    mask = torch.zeros(B, Hkv, q_len, L, dtype=torch.bool, device=dev)
    q_pos = torch.arange(past, past + q_len, device=dev)
    for b, row in enumerate(per):
        for h, (k, v, ords, _) in enumerate(row):
            n = k.shape[0]
            if n == 0:
                continue
            K[b, h, :n] = k.to(K.dtype)
            V[b, h, :n] = v.to(V.dtype)
            ords = ords.long().to(dev)
            if attention_mask is not None:
                m = attention_mask[b, 0][:, ords]  # HF's mask is in logical positions: column = ord
                if m.dtype != torch.bool:
                    m = m > torch.finfo(m.dtype).min / 2
            else:
                m = ords[None, :] <= q_pos[:, None]
            mask[b, h, :, :n] = m
    mask = mask.repeat_interleave(G, dim=1)
    # a query that may see nothing (a left-pad query) would give NaN; its output is unused
    empty = ~mask.any(dim=-1, keepdim=True)
    mask = mask | (empty & (torch.arange(L, device=dev) == 0))
    out = torch.nn.functional.scaled_dot_product_attention(query, K, V, attn_mask=mask, scale=scaling,
                                                           enable_gqa=G > 1)
    return out.transpose(1, 2).contiguous()
