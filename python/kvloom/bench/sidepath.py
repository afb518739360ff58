"""Side-path benchmark: sub-tasks on a grown conversation, three ways, in one run.

- kvloom side path: fork the conversation's cache, prefill the instruction, decode, drop.
- re-prefill: a fresh DynamicCache + sdpa, the whole conversation and the instruction
  prefilled, then decode (what a stack without cache reuse does).
- deepcopy: Hugging Face's recipe, ``copy.deepcopy`` of the conversation's DynamicCache per
  sub-task, the instruction prefilled onto the copy, decode.
- crop: the conversation's DynamicCache extended in place by the sub-task and cropped back
  (cheapest HF recipe, but one sub-task at a time and no compressed caches).

Per sub-task: prefill tokens computed, wall time, peak extra KV bytes over the conversation's.
"""
from __future__ import annotations

import copy
import time
from typing import Dict

import torch

from ..hf.compat import cache_kwargs
from .harness import Benchmark, add_common_options, ints, table

SUBTASKS = [
    "Rewrite my last message as one standalone question. Reply with the question only.",
    "Summarise our conversation so far in at most two sentences.",
    "Is my last message a question? Answer Yes or No.",
    "List three keywords of this conversation, separated by commas.",
    "Translate my last message into French.",
    "What is the topic of this conversation, in five words or fewer?",
    "Classify the tone of my last message as positive, neutral or negative.",
    "Suggest a short title for this conversation.",
]


def grow(conv, tok, n_tokens: int):
    """Fills `conv` with recorded turns of essay text until it holds about n_tokens tokens,
    ending with a user question; prefills it."""
    from ..apps.ciflex import _render
    from ..corpus import essays

    text = "\n\n".join(essays()[:20]) or ("Caches keep keys and values of tokens already seen. " * 2000)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pos, turn = 0, 0
    question = "Can you tell me more about the main argument?"

    while True:
        have = len(_render(tok, conv.messages + [{"role": "user", "content": question}], True))
        room = n_tokens - have
        if room < 40:
            break
        chunk = min(room - 16, 400)
        conv.add_turn("user" if turn % 2 == 0 else "assistant", tok.decode(ids[pos:pos + chunk]))
        pos += chunk
        turn += 1
    if conv.messages and conv.messages[-1]["role"] == "user":
        conv.add_turn("assistant", "I see.")
    conv.user(question).prefill()
    return conv


@torch.no_grad()
def _decode(model, cache, logits, new_tokens: int):
    nxt = logits.argmax(-1).view(1, 1)
    for _ in range(new_tokens - 1):
        nxt = model(nxt, **cache_kwargs(cache), use_cache=True).logits[:, -1].argmax(-1).view(1, 1)


METHODS = ("kvloom side path", "crop", "deepcopy", "re-prefill")


class SidePath(Benchmark):
    name = "sidepath"
    help = "CIFLEX sub-tasks on a grown conversation: kvloom side paths vs re-prefill vs DynamicCache copy/crop"

    def add_options(self, p) -> None:
        add_common_options(p)
        p.add_argument("--lengths", type=ints, default=[512, 1024, 2048, 4096], help="conversation tokens")
        p.add_argument("--subtasks", type=ints, default=[1, 2, 4, 8], help="sub-tasks per turn (k)")
        p.add_argument("--new-tokens", type=int, default=16, help="tokens decoded per sub-task")
        p.add_argument("--reprefill-max", type=int, default=2,
                       help="re-prefill runs per k at most (its cost does not depend on k)")

    def run(self, args) -> dict:
        from transformers import DynamicCache

        import kvloom
        from kvloom import models

        model, tok = models.load(args.model)
        kvloom.enable(model)
        convs: Dict[int, tuple] = {}

        def conversation(n):
            if n not in convs:
                convs.clear()  # one conversation (and its DynamicCache) alive at a time
                conv = grow(kvloom.Conversation(model, tok), tok, n)
                main_dc = DynamicCache()
                with torch.no_grad():
                    model(torch.tensor([conv.tokens]), **cache_kwargs(main_dc), use_cache=True)
                convs[n] = (conv, main_dc)
            return convs[n]

        cases = [(n, k) for n in args.lengths for k in args.subtasks]
        results = self.grid(cases, lambda c: self._subtasks(model, tok, *conversation(c[0]), c[0], c[1], args),
                            unit="k", postfix=lambda c, rows: f"{c[0]} tokens, k={c[1]}: {rows[0]['s_per_subtask']:.2f}s")
        convs.clear()
        rows = [r for rs in results for r in rs]
        for r in rows:
            base = next(x for x in rows if x["target_tokens"] == r["target_tokens"] and x["subtasks"] == r["subtasks"]
                        and x["method"] == "re-prefill")
            r["speedup_vs_reprefill"] = base["s_per_subtask"] / r["s_per_subtask"]
        return {"model": args.model or models.DEFAULT_MODEL, "new_tokens": args.new_tokens, "lengths": args.lengths,
                "subtasks": args.subtasks, "reprefill_measured_per_k": args.reprefill_max,
                "threads": kvloom.get_num_threads(), "rows": rows}

    @staticmethod
    def _subtasks(model, tok, conv, main_dc, n: int, k: int, args) -> list:
        """k sub-tasks on one conversation, each method; one row per method."""
        from transformers import DynamicCache

        from ..apps.ciflex import _render
        from .e2e import kv_bytes

        new_tokens = args.new_tokens
        main_bytes = conv.memory_bytes()
        conv_len = len(conv.tokens)
        res = {m: {"time": 0.0, "prefill": 0, "extra": 0, "n": 0} for m in METHODS}

        def record(method, dt, prefill, extra):
            r = res[method]
            r["time"] += dt
            r["prefill"] += prefill
            r["extra"] = max(r["extra"], extra)
            r["n"] += 1

        for i in range(k):
            instr = SUBTASKS[i % len(SUBTASKS)]
            full = _render(tok, conv.messages + [{"role": "user", "content": instr}], True)
            tail = torch.tensor([full[conv_len:]])
            # kvloom: fork, instruction, decode, drop
            t0 = time.perf_counter()
            with conv.side_path(instr) as side:
                side.generate(max_new_tokens=new_tokens, stop_at_eos=False)  # same work as the baselines
                extra = conv.memory_bytes() - main_bytes
                pre = side.prefill_tokens
            record("kvloom side path", time.perf_counter() - t0, pre, extra)
            assert conv.memory_bytes() == main_bytes
            # HF deepcopy recipe
            t0 = time.perf_counter()
            dc = copy.deepcopy(main_dc)
            with torch.no_grad():
                lg = model(tail, **cache_kwargs(dc), use_cache=True).logits[:, -1]
                _decode(model, dc, lg, new_tokens)
            record("deepcopy", time.perf_counter() - t0, tail.shape[1], kv_bytes(dc))
            del dc
            # HF crop: extend the conversation's cache in place, crop back
            base = kv_bytes(main_dc)
            t0 = time.perf_counter()
            with torch.no_grad():
                lg = model(tail, **cache_kwargs(main_dc), use_cache=True).logits[:, -1]
                _decode(model, main_dc, lg, new_tokens)
            extra = kv_bytes(main_dc) - base
            main_dc.crop(-(main_dc.get_seq_length() - conv_len))
            record("crop", time.perf_counter() - t0, tail.shape[1], extra)
            # re-prefill from scratch (its cost does not depend on k: run at most reprefill_max)
            if i < args.reprefill_max:
                t0 = time.perf_counter()
                dc = DynamicCache()
                with torch.no_grad():
                    lg = model(torch.tensor([full]), **cache_kwargs(dc), use_cache=True).logits[:, -1]
                    _decode(model, dc, lg, new_tokens)
                record("re-prefill", time.perf_counter() - t0, len(full), kv_bytes(dc))
                del dc
        return [{"conversation_tokens": conv_len, "target_tokens": n, "subtasks": k, "method": m,
                 "measured_subtasks": r["n"], "s_per_subtask": r["time"] / r["n"],
                 "prefill_tokens_per_subtask": r["prefill"] / r["n"], "peak_extra_kv_bytes": r["extra"],
                 "conversation_kv_bytes": main_bytes} for m, r in res.items()]

    def markdown(self, summary: dict) -> str:
        ks = summary["subtasks"]
        head = (f"Sub-tasks of {summary['new_tokens']} new tokens on a conversation; seconds per sub-task "
                f"(k sub-tasks per turn: {', '.join(map(str, ks))}), prefill tokens and peak extra KV per sub-task.\n\n")
        rows = []
        for n in summary["lengths"]:
            for method in METHODS:
                rs = {r["subtasks"]: r for r in summary["rows"] if r["target_tokens"] == n and r["method"] == method}
                if not rs:
                    continue
                last = rs[ks[-1]]
                rows.append([last["conversation_tokens"], method, *(f"{rs[k]['s_per_subtask']:.2f}" for k in ks),
                             f"{last['speedup_vs_reprefill']:.1f}×", f"{last['prefill_tokens_per_subtask']:.0f}",
                             f"{last['peak_extra_kv_bytes'] / 2**20:.1f}"])
        return head + table(["conversation tokens", "method", *(f"s/sub-task k={k}" for k in ks),
                             f"× re-prefill (k={ks[-1]})", "prefill tokens", "peak extra KV MiB"], rows)

    def draw(self, summary: dict, plt):
        k = summary["subtasks"][-1]
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        for method in METHODS:
            rs = [r for r in summary["rows"] if r["method"] == method and r["subtasks"] == k]
            xs = [r["conversation_tokens"] for r in rs]
            a.plot(xs, [r["s_per_subtask"] for r in rs], marker="o", label=method)
            b.plot(xs, [r["peak_extra_kv_bytes"] / 2**20 for r in rs], marker="o", label=method)
        a.set_xlabel("conversation tokens")
        a.set_ylabel(f"seconds per sub-task (k={k})")
        b.set_xlabel("conversation tokens")
        b.set_ylabel("peak extra KV MiB per sub-task")
        a.legend()
        return fig, f"{summary['model']}: side paths vs re-prefill vs DynamicCache copies"


BENCH = SidePath()
