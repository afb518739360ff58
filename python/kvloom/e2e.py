"""End-to-end benchmark: prefill time, decode tokens/s and KV bytes of kvloom.Cache policies
against DynamicCache + sdpa on the same model, prompts and machine, in one run."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .hf.compat import cache_kwargs


def _essay_ids(tok, n: int) -> torch.Tensor:
    from ._results import essays

    text = "\n\n".join(essays()[:12])
    if not text:  # deterministic filler when the essays are not installed
        text = " ".join(f"Line {i}: the cache keeps keys and values for every token it has seen." for i in range(4000))
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :n]
    if ids.shape[1] < n:
        ids = ids.repeat(1, n // ids.shape[1] + 1)[:, :n]
    return ids


def _kv_bytes(cache) -> int:
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
    return {"prefill_s": prefill, "decode_tok_s": new_tokens / decode, "kv_bytes": _kv_bytes(cache)}


def run(model_name: Optional[str], lengths: List[int], new_tokens: int, repeats: int, out_dir: Path,
        window_keep: float = 0.5) -> dict:
    from tqdm import tqdm
    from transformers import DynamicCache

    import kvloom
    from kvloom import models

    model, tok = models.load(model_name)
    kvloom.hf.register()
    cases = []
    for n in lengths:
        keep = max(8, int(n * window_keep))
        cases += [(n, "dynamic+sdpa", "sdpa", lambda: DynamicCache()),
                  (n, "kvloom full", "kvloom", lambda: kvloom.Cache(model)),
                  (n, f"kvloom window {int(window_keep * 100)}%", "kvloom",
                   (lambda keep=keep: kvloom.Cache(model, policy=kvloom.Window(4, keep - 4))))]
    rows = []
    # interleave repeats so slow drifts of the machine hit every case alike; keep the best
    best: Dict[tuple, dict] = {}
    with tqdm(total=len(cases) * repeats, desc="kvloom bench e2e", unit="run") as bar:
        for r in range(repeats):
            for n, name, attn, make in cases:
                ids = _essay_ids(tok, n)
                model.set_attn_implementation(attn)
                res = _run_one(model, ids, make, new_tokens)
                key = (n, name)
                if key not in best or res["decode_tok_s"] > best[key]["decode_tok_s"]:
                    best[key] = {**res, "prefill_s": min(res["prefill_s"], best.get(key, res)["prefill_s"])}
                bar.set_postfix_str(f"{name} @ {n}: {res['decode_tok_s']:.1f} tok/s")
                bar.update(1)
    model.set_attn_implementation("sdpa")
    for n in lengths:
        base = best[(n, "dynamic+sdpa")]
        for (m, name), res in best.items():
            if m != n:
                continue
            rows.append({"prompt_tokens": n, "cache": name, **res,
                         "decode_vs_dynamic": res["decode_tok_s"] / base["decode_tok_s"],
                         "kv_vs_dynamic": res["kv_bytes"] / base["kv_bytes"]})
    summary = {"model": model_name or models.DEFAULT_MODEL, "new_tokens": new_tokens, "repeats": repeats,
               "threads": kvloom.get_num_threads(), "torch_threads": torch.get_num_threads(), "rows": rows}
    from ._results import write

    write(out_dir, "e2e", summary, markdown, plot)
    return summary


def markdown(summary: dict) -> str:
    lines = ["| prompt tokens | cache | prefill s | decode tok/s | × DynamicCache | KV MiB | KV × DynamicCache |",
             "|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        lines.append(f"| {r['prompt_tokens']} | {r['cache']} | {r['prefill_s']:.2f} | {r['decode_tok_s']:.1f} | "
                     f"{r['decode_vs_dynamic']:.2f}× | {r['kv_bytes'] / 2**20:.1f} | {r['kv_vs_dynamic']:.2f}× |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> bool:
    from kvloom._plot import pyplot, save

    plt = pyplot()
    if plt is None:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = sorted({r["cache"] for r in summary["rows"]})
    for name in names:
        rs = [r for r in summary["rows"] if r["cache"] == name]
        xs = [r["prompt_tokens"] for r in rs]
        a.plot(xs, [r["decode_tok_s"] for r in rs], marker="o", label=name)
        b.plot(xs, [r["kv_bytes"] / 2**20 for r in rs], marker="o", label=name)
    a.set_xlabel("prompt tokens")
    a.set_ylabel("decode tokens/s")
    b.set_xlabel("prompt tokens")
    b.set_ylabel("KV MiB after decode")
    a.legend()
    return save(fig, path, f"{summary['model']}: kvloom vs DynamicCache + sdpa")
