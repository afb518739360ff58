"""kvloom's benchmarks: one :class:`~kvloom.bench.harness.Benchmark` per module, one entry point
(``kvloom bench <name>``), one README-table updater (``kvloom bench readme``).

Every module of this package that defines ``BENCH`` is a benchmark; the registry below is
built by importing them, so adding a benchmark is adding a module.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Dict

from .harness import Benchmark

_SKIP = {"harness", "attention_cases", "grids"}


def registry() -> Dict[str, Benchmark]:
    """name -> benchmark, for every module with a ``BENCH``."""
    out: Dict[str, Benchmark] = {}
    for m in pkgutil.iter_modules(__path__):
        if m.name in _SKIP or m.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{m.name}")
        bench = getattr(mod, "BENCH", None)
        if isinstance(bench, Benchmark):
            out[bench.name] = bench
    return dict(sorted(out.items()))
