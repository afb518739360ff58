"""Hugging Face transformers integration: ``kvloom.Cache`` and the ``"kvloom"`` attention."""
from __future__ import annotations

from .arch import SUPPORTED, geometry
from .attention import NAME, kvloom_attention_forward
from .cache import LoomCache
from .compat import cache_kwarg, cache_kwargs

__all__ = ["LoomCache", "enable", "register", "kvloom_attention_forward", "SUPPORTED", "geometry", "NAME",
           "cache_kwarg", "cache_kwargs"]

_registered = False


def register() -> None:
    """Registers the ``"kvloom"`` attention (and its mask builder) with transformers."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, kvloom_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True


def enable(model):
    """Switches ``model`` to kvloom's attention (public transformers API only: the attention
    registry and ``set_attn_implementation``). Returns the model. Checks the architecture."""
    geometry(model)  # NotImplementedError for unsupported architectures, before anything changes
    register()
    model.set_attn_implementation(NAME)
    return model
