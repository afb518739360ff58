"""Methods at equal bytes (issue 15): every policy, in the model's dtype and quantized, under one
memory budget (``kvloom.Cache(model, policy=..., kv_dtype=..., kv_budget=...)``).

The fidelity benchmark's protocol, with needles asked both inside the prompt and only after
the document was prefilled and compressed (``--question both``, the default here), at the
haystack lengths given. Each row is a policy (and format) held to ``--budget`` of Full's bytes
by the policy's own give-way rule (README, *Memory budget*); Full (no budget) is the reference.
"""
from __future__ import annotations

from typing import Dict

from .fidelity import Fidelity
from .harness import words

POLICIES = ["full", "window", "h2o", "fastgen", "taskkv", "nats"]


class Budget(Fidelity):
    name = "budget"
    help = "every policy (fp and quantized) held to one kv_budget: bytes, needles (question in/after), perplexity"

    def add_options(self, p) -> None:
        super().add_options(p)
        p.set_defaults(question="both", lengths=[2048, 4096])
        p.add_argument("--budget", type=float, default=0.25, help="kv_budget of every row, a fraction of Full's bytes")
        p.add_argument("--policies", type=words, default=POLICIES, help=f"policies (default {','.join(POLICIES)})")
        p.add_argument("--formats", type=words, default=["fp", "int4"],
                       help="storage of each row: fp (the model's dtype), int8, int4, int2 (default fp,int4)")

    def settings(self, args) -> Dict[str, object]:
        import kvloom
        from ..cache import check_budget

        check_budget(args.budget)
        pols = {"full": kvloom.Full(), "window": kvloom.Window(4, 1 << 20), "h2o": kvloom.HeavyHitter(1.0, 64),
                "fastgen": kvloom.FastGen(1.0), "taskkv": kvloom.TaskKV(beta=0.0, m=0, sinks=4, recent=32, budget=0.2),
                "nats": "nats"}
        unknown = [p for p in args.policies if p not in pols]
        if unknown:
            raise ValueError(f"unknown --policies {unknown}; choose from {list(pols)}")
        bad = [f for f in args.formats if f not in ("fp", "int8", "int4", "int2")]
        if bad:
            raise ValueError(f"unknown --formats {bad}; choose from fp, int8, int4, int2")
        out: Dict[str, object] = {"full": None}
        for f in args.formats:
            for p in args.policies:
                pol = pols[p]
                if pol == "nats":
                    pol = kvloom.NAtS()  # the scorer shipped for SmolLM2 (loaded once, shared by the rows)
                    pols["nats"] = pol
                name = f"{p} @{args.budget:g}" + ("" if f == "fp" else f" {f}")
                out[name] = {"policy": pol, "kv_dtype": None if f == "fp" else f, "kv_budget": args.budget}
        return out

    def run(self, args) -> dict:
        summary = super().run(args)
        summary["budget"] = args.budget
        return summary


BENCH = Budget()
