"""Eviction policies: one file each, one registry.

Every module of this package is imported here, and each registers its policy class with
:func:`register`; so adding a policy is adding a file (plus, where it needs C++, one plan
file in ``cpp/src/plans/``). ``kvloom.make_policy``, the CLI's ``--policy`` and its
parameters, and the shared policy tests all read the registry::

    >>> from kvloom import policies
    >>> policies.names()
    ['full', 'window', 'h2o', 'fastgen', 'taskkv', 'nats']
    >>> policies.make("window", recent=256)
    window(sinks=4, recent=256)
"""
import importlib
import pkgutil

from .base import REGISTRY, Param, Policy, get, make, names, param, register, unregister

_ORDER = ("full", "window", "h2o", "fastgen", "taskkv", "nats")  # the built-ins, in this order; others after


def _load_all() -> None:
    found = [m.name for m in pkgutil.iter_modules(__path__) if m.name != "base" and not m.name.startswith("_")]
    for name in sorted(found, key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n)):
        importlib.import_module(f"{__name__}.{name}")


_load_all()
globals().update({cls.__name__: cls for cls in REGISTRY.values()})

__all__ = ["Policy", "Param", "param", "register", "unregister", "get", "make", "names", "REGISTRY",
           *(cls.__name__ for cls in REGISTRY.values())]
