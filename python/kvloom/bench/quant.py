"""Quantized KV storage (issue 15): each format alone and combined with eviction, against
transformers' QuantizedCache, with the fidelity benchmark's protocol.

For int8 / int4 / int2 (``kvloom.Cache(model, kv_dtype=...)``) alone and with Window (half of
the prompt), FastGen and Task-KV: real KV bytes vs Full in the model's dtype, perplexity of
held-out essay text decoded through the cache, needle retrieval, greedy agreement with Full and
decode tokens/s. Beside them in the same run, transformers' ``QuantizedCache`` with the quanto
and HQQ backends at 4 and 2 bits, where they import (``pip install --no-deps optimum-quanto``;
``pip install --no-deps hqq termcolor``); the table says why one did not.
"""
from __future__ import annotations

from typing import Dict

from .fidelity import Fidelity
from .harness import words

FORMATS = ["int8", "int4", "int2"]


BACKENDS = {"quanto": "optimum.quanto", "hqq": "hqq.core.quantize"}


def _quantized_cache(backend: str, nbits: int):
    """(factory of transformers' QuantizedCache with this backend, None) or (None, why not)."""
    try:
        import importlib

        importlib.import_module(BACKENDS[backend])
        from transformers import QuantizedCache
    except Exception as e:  # not installed, or installed without what it needs
        return None, f"{type(e).__name__}: {e}"

    def make(model, tok, prompt_len):
        return QuantizedCache(backend=backend, config=model.config, nbits=nbits)

    return make, None


class Quant(Fidelity):
    name = "quant"
    help = "quantized KV (int8/int4/int2) alone and with eviction vs transformers' QuantizedCache: bytes, perplexity, needles"

    def add_options(self, p) -> None:
        super().add_options(p)
        p.add_argument("--formats", type=words, default=FORMATS, help="kv_dtype values (default int8,int4,int2)")
        p.add_argument("--policies", type=words, default=["full", "window", "fastgen", "taskkv"],
                       help="policies each format runs with (default full,window,fastgen,taskkv)")
        p.add_argument("--backends", type=words, default=list(BACKENDS),
                       help="transformers QuantizedCache backends compared (default quanto,hqq)")

    def settings(self, args) -> Dict[str, object]:
        import kvloom

        pols = {"full": None, "window": ("window", 0.5), "fastgen": kvloom.FastGen(0.95),
                "taskkv": kvloom.TaskKV(beta=0.0, m=0, sinks=4, recent=32, budget=0.2)}
        unknown = [p for p in args.policies if p not in pols]
        if unknown:
            raise ValueError(f"unknown --policies {unknown}; choose from {list(pols)}")
        bad = [f for f in args.formats if f not in FORMATS]
        if bad:
            raise ValueError(f"unknown --formats {bad}; choose from {FORMATS}")
        if [b for b in args.backends if b not in BACKENDS]:
            raise ValueError(f"unknown --backends {[b for b in args.backends if b not in BACKENDS]}; choose from {list(BACKENDS)}")
        out: Dict[str, object] = {"full": None}
        for p in args.policies:
            if p != "full":
                out[p] = pols[p]
        for f in args.formats:
            for p in args.policies:
                out[f if p == "full" else f"{f} + {p}"] = {"policy": pols[p], "kv_dtype": f}
        self.missing = []
        for backend in args.backends:
            for bits in (4, 2):
                make, why = _quantized_cache(backend, bits)
                if make is None:
                    self.missing.append(f"QuantizedCache int{bits} ({backend}): {why}")
                else:
                    out[f"QuantizedCache int{bits} ({backend})"] = make
        return out

    def run(self, args) -> dict:
        summary = super().run(args)
        summary["not_run"] = getattr(self, "missing", [])
        return summary

    def markdown(self, summary: dict) -> str:
        out = super().markdown(summary)
        for m in summary.get("not_run", []):
            out += f"\n\nNot run: {m}."
        return out


BENCH = Quant()
