"""kvloom: a KV-cache runtime for transformer decoding.

A C++ core (paged per-head KV cache with forks, rollback and eviction policies; fast
GQA-aware CPU decode attention) behind a small Python API. See the README.

Layout: ``kvloom.KVCache`` / ``kvloom.ops`` / ``kvloom.policies`` are the core API (they do
not import transformers); ``kvloom.hf`` is the transformers adapter (``kvloom.Cache``);
``kvloom.apps`` holds applications (CIFLEX side paths, Hogwild! workers), ``kvloom.methods``
model-changing methods (GQA/CLA conversion, NAtS training), ``kvloom.bench`` the benchmarks.
"""
import importlib

from ._version import __version__
from . import _core
from ._core import CapacityError, ConcurrencyError
from .cache import BlockPool, KVCache, default_capacity_bytes, make_policy
from .snapshot import SnapshotError
from . import ops, policies
from .policies import FastGen, Full, HeavyHitter, NAtS, Policy, TaskKV, Window

# Names that load their (transformers-using) module on first use: name -> (module, attribute or None).
_LAZY = {
    "Cache": ("kvloom.hf", "LoomCache"),
    "enable": ("kvloom.hf", "enable"),
    "hf": ("kvloom.hf", None),
    "Conversation": ("kvloom.apps.ciflex", "Conversation"),
    "ciflex": ("kvloom.apps.ciflex", None),
    "hogwild": ("kvloom.apps.hogwild", None),
    "convert": ("kvloom.methods.convert", None),
    "nats": ("kvloom.methods.nats", None),
    "apps": ("kvloom.apps", None),
    "methods": ("kvloom.methods", None),
    "bench": ("kvloom.bench", None),
    "models": ("kvloom.models", None),
    "reference": ("kvloom.reference", None),
    "corpus": ("kvloom.corpus", None),
    "distributed": ("kvloom.distributed", None),
}


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        mod = importlib.import_module(module)
        return mod if attr is None else getattr(mod, attr)
    raise AttributeError(f"module 'kvloom' has no attribute {name!r}")


__all__ = [
    "__version__", "CapacityError", "ConcurrencyError", "SnapshotError", "BlockPool", "KVCache", "make_policy", "policies", "Policy", "Full", "Window",
    "HeavyHitter", "FastGen", "TaskKV", "NAtS", "ops", "set_num_threads", "get_num_threads", "kernel_isa",
    "default_capacity_bytes", *_LAZY,
]


def set_num_threads(n: int) -> None:
    """Threads used by kvloom's kernels (default: all cores, or KVLOOM_NUM_THREADS)."""
    _core.set_num_threads(int(n))


def get_num_threads() -> int:
    return _core.get_num_threads()


def kernel_isa() -> str:
    """The CPU kernel path chosen at run time: 'avx2' or 'generic'."""
    return _core.kernel_isa()
