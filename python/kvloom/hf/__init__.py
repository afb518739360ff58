"""Hugging Face transformers integration: ``kvloom.Cache`` and the ``"kvloom"`` attention.

Importing this package does not import transformers; the names below load it on first use
(``arch`` and ``compat`` never do).
"""
from __future__ import annotations

import importlib

from .arch import SUPPORTED, geometry
from .compat import cache_kwarg, cache_kwargs

__all__ = ["LoomCache", "enable", "register", "kvloom_attention_forward", "SUPPORTED", "geometry", "NAME",
           "cache_kwarg", "cache_kwargs"]

NAME = "kvloom"
_registered = False


def __getattr__(name):
    if name == "LoomCache":
        return importlib.import_module(".cache", __name__).LoomCache
    if name == "kvloom_attention_forward":
        return importlib.import_module(".attention", __name__).kvloom_attention_forward
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    """Registers the ``"kvloom"`` attention (and its mask builder) with transformers."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from .attention import kvloom_attention_forward

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
