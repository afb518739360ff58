"""Hogwild! benchmark (`kvloom bench hogwild`): aggregate decode tokens/s of N workers over one
shared cache vs one worker, and vs N independent sequences in one batched kvloom.Cache."""
from __future__ import annotations

import time

import torch

from ..hf.compat import cache_kwargs
from .harness import Benchmark, add_common_options, ints, table

BENCH_PROBLEM = ("Plan a one-day trip for four people: a museum in the morning, lunch, a walk and dinner. "
                 "Give times and rough costs.")


def _problem_with_context(tok, context_tokens: int) -> str:
    """The benchmark problem, after about `context_tokens` tokens of essay text."""
    if context_tokens <= 0:
        return BENCH_PROBLEM
    from ..corpus import essays

    text = "\n\n".join(essays()[:12]) or ("Notes on planning trips with friends. " * 2000)
    ids = tok(text, add_special_tokens=False)["input_ids"][:context_tokens]
    return "Background notes:\n" + tok.decode(ids) + "\n\nTask: " + BENCH_PROBLEM


@torch.no_grad()
def _independent(model, prompt: torch.Tensor, n: int, new_tokens: int) -> float:
    """Seconds to decode new_tokens for n independent sequences (one batched forward per
    token, each row its own C++ sequence), prompt prefilled beforehand."""
    import kvloom

    cache = kvloom.Cache(model)
    out = model(prompt.repeat(n, 1), **cache_kwargs(cache), use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        nxt = model(nxt, **cache_kwargs(cache), use_cache=True).logits[:, -1:].argmax(-1)
    dt = time.perf_counter() - t0
    cache.close()
    return dt


class HogwildBench(Benchmark):
    name = "hogwild"
    help = "Hogwild! workers over one shared cache: tokens/s vs one worker and vs independent sequences"

    def add_options(self, p) -> None:
        add_common_options(p)
        p.add_argument("--lengths", type=ints, default=[0, 2048], help="context tokens before the problem (0: none)")
        p.add_argument("--workers", type=ints, default=[1, 2, 4], help="worker counts")
        p.add_argument("--new-tokens", type=int, default=64, help="tokens per worker")
        p.add_argument("--repeats", type=int, default=2, help="repeats per case (best kept)")

    def run(self, args) -> dict:
        import kvloom
        from kvloom import models

        from ..apps.hogwild import Session

        model, tok = models.load(args.model)
        kvloom.enable(model)
        new_tokens = args.new_tokens

        def one(case):
            ctx, n = case
            problem = _problem_with_context(tok, ctx)
            best_h, best_i, prompt_len = float("inf"), float("inf"), 0
            for _ in range(args.repeats):
                s = Session(model, tok, problem, n, ignore_eos=True)
                prompt_len = int(s.prompt.shape[1])
                t0 = time.perf_counter()
                while s.active:
                    s.step(new_tokens)
                best_h = min(best_h, time.perf_counter() - t0)
                prompt = s.prompt
                s.close()
                best_i = min(best_i, _independent(model, prompt, n, new_tokens))
            return {"context_tokens": ctx, "prompt_tokens": prompt_len, "workers": n,
                    "hogwild_tok_s": n * new_tokens / best_h, "independent_tok_s": n * new_tokens / best_i}

        cases = [(ctx, n) for ctx in args.lengths for n in args.workers]
        rows = self.grid(cases, one, postfix=lambda c, r: f"ctx {c[0]}, {c[1]} workers: {r['hogwild_tok_s']:.1f} tok/s")
        for r in rows:
            one_w = next(x for x in rows if x["context_tokens"] == r["context_tokens"] and x["workers"] == 1)
            r["hogwild_vs_one_worker"] = r["hogwild_tok_s"] / one_w["hogwild_tok_s"]
            r["hogwild_vs_independent"] = r["hogwild_tok_s"] / r["independent_tok_s"]
        return {"model": args.model or models.DEFAULT_MODEL, "new_tokens_per_worker": new_tokens,
                "repeats": args.repeats, "threads": kvloom.get_num_threads(), "rows": rows}

    def markdown(self, summary: dict) -> str:
        head = (f"{summary['new_tokens_per_worker']} new tokens per worker, greedy; aggregate decode tokens/s "
                "(prefill excluded)\n\n")
        rows = [[r["context_tokens"] or "short", r["prompt_tokens"], r["workers"], f"{r['hogwild_tok_s']:.1f}",
                 f"{r['hogwild_vs_one_worker']:.2f}×", f"{r['independent_tok_s']:.1f}",
                 f"{r['hogwild_vs_independent']:.2f}×"] for r in summary["rows"]]
        return head + table(["context", "prompt tokens", "workers", "Hogwild! tok/s", "× 1 worker",
                             "independent sequences tok/s", "Hogwild! / independent"], rows)

    def draw(self, summary: dict, plt):
        fig, ax = plt.subplots(figsize=(6, 4))
        for ctx in sorted({r["context_tokens"] for r in summary["rows"]}):
            rs = [r for r in summary["rows"] if r["context_tokens"] == ctx]
            label = f"context {ctx or 'short'}"
            ax.plot([r["workers"] for r in rs], [r["hogwild_tok_s"] for r in rs], marker="o", label=f"Hogwild!, {label}")
            ax.plot([r["workers"] for r in rs], [r["independent_tok_s"] for r in rs], marker="x", linestyle="--",
                    label=f"independent, {label}")
        ax.set_xlabel("workers")
        ax.set_ylabel("aggregate decode tokens/s")
        ax.legend(fontsize=7)
        return fig, f"{summary['model']}: Hogwild! workers"


BENCH = HogwildBench()
