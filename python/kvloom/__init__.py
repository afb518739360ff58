"""kvloom: a KV-cache runtime for transformer decoding.

A C++ core (paged per-head KV cache with forks, rollback and eviction policies; fast
GQA-aware CPU decode attention) behind a small Python API. See the README.
"""
from ._version import __version__
from . import _core
from ._core import CapacityError
from .cache import BlockPool, FastGen, Full, HeavyHitter, KVCache, NAtS, TaskKV, Window, default_capacity_bytes
from . import ops


def __getattr__(name):
    # transformers is imported only when the HF integration is used
    if name in ("Conversation", "ciflex"):
        import importlib

        ciflex = importlib.import_module(".ciflex", __name__)
        return ciflex if name == "ciflex" else ciflex.Conversation
    if name in ("Cache", "enable", "hf"):
        import importlib

        hf = importlib.import_module(".hf", __name__)
        return {"Cache": hf.LoomCache, "enable": hf.enable, "hf": hf}[name]
    raise AttributeError(f"module 'kvloom' has no attribute {name!r}")

__all__ = [
    "__version__", "CapacityError", "BlockPool", "KVCache", "Full", "Window", "HeavyHitter", "FastGen", "TaskKV", "NAtS", "ops",
    "set_num_threads", "get_num_threads", "kernel_isa", "default_capacity_bytes", "Cache", "enable",
    "Conversation", "ciflex",
]


def set_num_threads(n: int) -> None:
    """Threads used by kvloom's kernels (default: all cores, or KVLOOM_NUM_THREADS)."""
    _core.set_num_threads(int(n))


def get_num_threads() -> int:
    return _core.get_num_threads()


def kernel_isa() -> str:
    """The CPU kernel path chosen at run time: 'avx2' or 'generic'."""
    return _core.kernel_isa()
