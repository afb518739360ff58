"""Which Hugging Face architectures kvloom drives, and their KV geometry."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

# model_type -> family. Llama/Qwen/Mistral/Gemma 3: RoPE + GQA; GPT-2: absolute positions, MHA.
SUPPORTED = {
    "llama": "llama",
    "smollm3": "llama",
    "qwen2": "qwen",
    "qwen3": "qwen",
    "mistral": "mistral",
    "gemma3_text": "gemma3",
    "gpt2": "gpt2",
}


@dataclass(frozen=True)
class Geometry:
    model_type: str
    n_layers: int
    n_q_heads: int
    n_kv_heads: int
    head_dim: int
    windows: List[Optional[int]]  # per layer: sliding-window size, or None for full attention


def text_config(model_or_config):
    cfg = getattr(model_or_config, "config", model_or_config)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def geometry(model_or_config) -> Geometry:
    """KV geometry of a supported model; NotImplementedError naming the architecture otherwise."""
    cfg = text_config(model_or_config)
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED:
        raise NotImplementedError(
            f"kvloom does not support the {mt!r} architecture (yet); supported model types: "
            f"{', '.join(sorted(SUPPORTED))}")
    if getattr(cfg, "is_encoder_decoder", False) or getattr(cfg, "add_cross_attention", False):
        raise NotImplementedError("kvloom supports decoder-only models; this config has cross-attention")
    if getattr(cfg, "use_bidirectional_attention", False):
        raise NotImplementedError("kvloom decodes causal models; this config uses bidirectional attention")
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        raise NotImplementedError("attention logit soft-capping is not supported by kvloom's kernels")
    if mt == "gpt2":
        n_layers, hq = cfg.n_layer, cfg.n_head
        hkv, hd = hq, cfg.n_embd // cfg.n_head
    else:
        n_layers, hq = cfg.num_hidden_layers, cfg.num_attention_heads
        hkv = getattr(cfg, "num_key_value_heads", None) or hq
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    windows: List[Optional[int]] = [None] * n_layers
    layer_types = getattr(cfg, "layer_types", None)
    sw = getattr(cfg, "sliding_window", None)
    if layer_types is not None:
        for i, t in enumerate(layer_types[:n_layers]):
            if t == "sliding_attention":
                windows[i] = sw
            elif t not in ("full_attention", None):
                raise NotImplementedError(f"layer type {t!r} (layer {i}) is not supported by kvloom")
    elif mt == "mistral" and sw:
        windows = [sw] * n_layers
    for i, w in enumerate(windows):
        if w is not None and w < 2:
            raise NotImplementedError(f"sliding window {w} on layer {i}: kvloom needs windows of at least 2 tokens")
    return Geometry(mt, n_layers, hq, hkv, hd, windows)


def tensor_parallel_size(model) -> int:
    """How many processes share the model's attention heads (transformers' tensor parallelism,
    ``from_pretrained(..., tp_plan="auto")`` under torchrun); 1 without it."""
    return int(getattr(model, "_tp_size", None) or 1)


def tensor_parallel_group(model):
    """The process group whose ranks share the model's heads (rank order = head order), or None
    without tensor parallelism. It is the mesh of the attention weights (DTensors); the default
    group if the weights do not say."""
    if tensor_parallel_size(model) == 1:
        return None
    for m in attention_modules(model):
        for p in m.parameters():
            mesh = getattr(p, "device_mesh", None)
            if mesh is not None:
                names = getattr(mesh, "mesh_dim_names", None) or ()
                return mesh.get_group("tp") if mesh.ndim > 1 and "tp" in names else mesh.get_group()
    import torch.distributed as dist

    return dist.group.WORLD


def local_geometry(model) -> Geometry:
    """The geometry of this process's part of `model`: under tensor parallelism each rank holds
    n_q_heads / tp and n_kv_heads / tp of the heads (transformers shards q/k/v column-wise)."""
    geo = geometry(model)
    tp = tensor_parallel_size(model)
    if tp == 1:
        return geo
    if geo.n_kv_heads % tp or geo.n_q_heads % tp:
        raise NotImplementedError(f"tensor parallelism over {tp} processes needs the {geo.n_q_heads} query and "
                                  f"{geo.n_kv_heads} kv heads to divide evenly")
    return Geometry(geo.model_type, geo.n_layers, geo.n_q_heads // tp, geo.n_kv_heads // tp, geo.head_dim, geo.windows)


def attention_modules(model) -> list:
    """The model's attention modules (those with a layer_idx), in module order."""
    return [m for m in model.modules() if hasattr(m, "layer_idx") and "attention" in type(m).__name__.lower()]


def cla_owner(layer: int, factor: int) -> int:
    """The layer whose KV `layer` reads under cross-layer attention with groups of `factor`."""
    return layer - layer % factor


def layer_store(model_or_config) -> Optional[List[int]]:
    """The CLA layer → owner map declared by a model's config (``kvloom_cla_factor``, written
    by ``kvloom.convert.to_cla``, or ``cla_share_factor`` as in the CLA paper's models), or None."""
    cfg = text_config(model_or_config)
    factor = int(getattr(cfg, "kvloom_cla_factor", None) or getattr(cfg, "cla_share_factor", None) or 1)
    if factor == 1:
        return None
    return [cla_owner(i, factor) for i in range(cfg.num_hidden_layers)]
