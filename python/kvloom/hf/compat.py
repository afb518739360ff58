"""The keyword transformers models take a cache by, across the releases kvloom supports
(``>=5.0,<6``, declared in pyproject.toml; CI tests the oldest and the newest).

transformers 5.24 renamed the cache argument of ``forward()`` and ``generate()`` from
``past_key_values=`` to ``cache=`` (the old name warns, and is dropped from models' internals
in 5.40 and from ``generate()`` in 6.0). kvloom passes caches with :func:`cache_kwargs`, so
its own calls use whichever name the installed release expects and never warn. In your own
code on transformers >= 5.24 simply write ``model.generate(**inputs, cache=cache)``.
"""
from __future__ import annotations

import functools
import inspect

@functools.lru_cache(maxsize=None)
def cache_kwarg() -> str:
    """``"cache"`` on transformers releases whose models take ``cache=`` (5.24 and later),
    ``"past_key_values"`` on older ones. Read from the signature of a model's ``forward``,
    not from the version number, so a backport or a dev build is judged by what it does."""
    from transformers import LlamaForCausalLM

    params = inspect.signature(LlamaForCausalLM.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(cache) -> dict:
    """``{name: cache}`` with the keyword the installed transformers expects::

        model.generate(**inputs, **kvloom.hf.cache_kwargs(cache))
    """
    return {cache_kwarg(): cache}


def passed_cache(cache=None, past_key_values=None):
    """The cache an attention module was handed, under either name (a module written for
    both releases takes both keywords). Raises if both were given and differ."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise TypeError("got both cache= and past_key_values= with different objects; pass one")
    return cache if cache is not None else past_key_values


def tensor_parallel_kwargs() -> dict:
    """The ``from_pretrained`` keywords that shard a model's heads over the processes of a
    torchrun job: ``distributed_config=DistributedConfig(tp_plan="auto")`` where that exists
    (passing ``tp_plan=`` directly is deprecated there), ``tp_plan="auto"`` before."""
    try:
        from transformers.distributed import DistributedConfig

        if "tp_plan" in inspect.signature(DistributedConfig).parameters:
            return {"distributed_config": DistributedConfig(tp_plan="auto")}
    except ImportError:
        pass
    return {"tp_plan": "auto"}
