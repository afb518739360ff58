"""End-to-end benchmark: prefill time, decode tokens/s and KV bytes of kvloom.Cache policies
against DynamicCache + sdpa on the same model, prompts and machine, in one run."""
from __future__ import annotations

import time
from typing import Dict

import torch

from ..hf.compat import cache_kwargs
from .harness import Benchmark, add_common_options, ints, table, words


def essay_ids(tok, n: int) -> torch.Tensor:
    """[1, n] token ids of essay text (deterministic filler without the essays)."""
    from ..corpus import essays

    text = "\n\n".join(essays()[:12])
    if not text:  # deterministic filler when the essays are not installed
        text = " ".join(f"Line {i}: the cache keeps keys and values for every token it has seen." for i in range(4000))
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :n]
    if ids.shape[1] < n:
        ids = ids.repeat(1, n // ids.shape[1] + 1)[:, :n]
    return ids


def kv_bytes(cache) -> int:
    """KV bytes a cache holds: kvloom's exact count, or a DynamicCache's tensors."""
    if hasattr(cache, "memory_bytes"):
        return int(cache.memory_bytes())
    total = 0
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None:
            total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total


@torch.no_grad()
def _run_one(model, ids: torch.Tensor, make_cache, new_tokens: int) -> Dict[str, float]:
    cache = make_cache()
    t0 = time.perf_counter()
    out = model(ids, **cache_kwargs(cache), use_cache=True)
    prefill = time.perf_counter() - t0
    nxt = out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(nxt, **cache_kwargs(cache), use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
    decode = time.perf_counter() - t0
    return {"prefill_s": prefill, "decode_tok_s": new_tokens / decode, "kv_bytes": kv_bytes(cache)}


class E2E(Benchmark):
    name = "e2e"
    help = "end to end: prefill, decode tokens/s and KV bytes of kvloom.Cache vs DynamicCache + sdpa"

    def add_options(self, p) -> None:
        add_common_options(p)
        p.add_argument("--lengths", type=ints, default=[512, 2048, 4096], help="prompt tokens (default 512,2048,4096)")
        p.add_argument("--new-tokens", type=int, default=32, help="decoded tokens per run")
        p.add_argument("--repeats", type=int, default=2, help="interleaved repeats (best kept)")
        p.add_argument("--window-keep", type=float, default=0.5, help="fraction of the prompt Window keeps")
        p.add_argument("--policies", type=words, default=["full", "window", "h2o", "fastgen", "taskkv"],
                       help="kvloom rows (full, window, h2o, fastgen, taskkv; default: all)")
        p.add_argument("--kv-dtype", type=words, default=[],
                       help="also run each kvloom row with these quantized formats (int8,int4,int2; default: none)")

    def run(self, args) -> dict:
        from transformers import DynamicCache

        import kvloom
        from kvloom import models

        model, tok = models.load(args.model)
        kvloom.hf.register()
        pct = int(args.window_keep * 100)
        kinds = {"full": ("kvloom full", lambda n: None),
                 "window": (f"kvloom window {pct}%", lambda n: kvloom.Window(4, max(8, int(n * args.window_keep)) - 4)),
                 "h2o": ("kvloom h2o 30%", lambda n: kvloom.HeavyHitter(0.3, 64)),
                 "fastgen": ("kvloom fastgen 0.95", lambda n: kvloom.FastGen(0.95)),
                 "taskkv": ("kvloom taskkv 40%", lambda n: kvloom.TaskKV(beta=0.0, m=0, sinks=4, recent=32, budget=0.4))}
        unknown = [name for name in args.policies if name not in kinds]
        if unknown:
            raise ValueError(f"--policies: unknown {', '.join(unknown)}; choose from {', '.join(kinds)}")
        bad = [kd for kd in args.kv_dtype if kd not in ("int8", "int4", "int2")]
        if bad:
            raise ValueError(f"--kv-dtype: unknown {', '.join(bad)}; choose from int8, int4, int2")
        makers = {"dynamic+sdpa": ("sdpa", lambda n: DynamicCache())}
        for kd in [None] + list(args.kv_dtype):
            for name in args.policies:
                label, pol = kinds[name]
                makers[label if kd is None else f"{label} {kd}"] = (
                    "kvloom", lambda n, pol=pol, kd=kd: kvloom.Cache(model, policy=pol(n), tokenizer=tok, kv_dtype=kd))
        # interleave repeats so slow drifts of the machine hit every case alike; keep the best
        cases = [(n, name) for _ in range(args.repeats) for n in args.lengths for name in makers]

        def one(case):
            n, name = case
            attn, make = makers[name]
            model.set_attn_implementation(attn)
            return _run_one(model, essay_ids(tok, n), lambda: make(n), args.new_tokens)

        results = self.grid(cases, one, postfix=lambda c, r: f"{c[1]} @ {c[0]}: {r['decode_tok_s']:.1f} tok/s")
        model.set_attn_implementation("sdpa")
        best: Dict[tuple, dict] = {}
        for key, res in zip(cases, results):
            if key not in best or res["decode_tok_s"] > best[key]["decode_tok_s"]:
                best[key] = {**res, "prefill_s": min(res["prefill_s"], best.get(key, res)["prefill_s"])}
        rows = []
        for n in args.lengths:
            base = best[(n, "dynamic+sdpa")]
            for name in makers:
                res = best[(n, name)]
                rows.append({"prompt_tokens": n, "cache": name, **res,
                             "decode_vs_dynamic": res["decode_tok_s"] / base["decode_tok_s"],
                             "kv_vs_dynamic": res["kv_bytes"] / base["kv_bytes"]})
        return {"model": args.model or models.DEFAULT_MODEL, "new_tokens": args.new_tokens, "repeats": args.repeats,
                "threads": kvloom.get_num_threads(), "torch_threads": torch.get_num_threads(), "rows": rows}

    def markdown(self, summary: dict) -> str:
        rows = [[r["prompt_tokens"], r["cache"], f"{r['prefill_s']:.2f}", f"{r['decode_tok_s']:.1f}",
                 f"{r['decode_vs_dynamic']:.2f}×", f"{r['kv_bytes'] / 2**20:.1f}", f"{r['kv_vs_dynamic']:.2f}×"]
                for r in summary["rows"]]
        return table(["prompt tokens", "cache", "prefill s", "decode tok/s", "× DynamicCache", "KV MiB",
                      "KV × DynamicCache"], rows)

    def draw(self, summary: dict, plt):
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        for name in sorted({r["cache"] for r in summary["rows"]}):
            rs = [r for r in summary["rows"] if r["cache"] == name]
            xs = [r["prompt_tokens"] for r in rs]
            a.plot(xs, [r["decode_tok_s"] for r in rs], marker="o", label=name)
            b.plot(xs, [r["kv_bytes"] / 2**20 for r in rs], marker="o", label=name)
        a.set_xlabel("prompt tokens")
        a.set_ylabel("decode tokens/s")
        b.set_xlabel("prompt tokens")
        b.set_ylabel("KV MiB after decode")
        a.legend()
        return fig, f"{summary['model']}: kvloom vs DynamicCache + sdpa"


BENCH = E2E()
