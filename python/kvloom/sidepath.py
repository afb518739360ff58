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
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .hf.compat import cache_kwargs

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
    from ._results import essays

    text = "\n\n".join(essays()[:20]) or ("Caches keep keys and values of tokens already seen. " * 2000)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pos, turn = 0, 0
    question = "Can you tell me more about the main argument?"
    from .ciflex import _render

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


def run(model_name: Optional[str], lengths: List[int], subtasks: List[int], new_tokens: int, out_dir: Path,
        reprefill_max: int = 2) -> dict:
    from tqdm import tqdm
    from transformers import DynamicCache

    import kvloom
    from kvloom import models
    from .ciflex import _render
    from .e2e import _kv_bytes

    model, tok = models.load(model_name)
    kvloom.enable(model)
    rows = []
    work = len(lengths) * sum(3 * k + min(k, reprefill_max) for k in subtasks)
    with tqdm(total=work, desc="kvloom bench sidepath", unit="sub-task") as bar:
        for n in lengths:
            conv = grow(kvloom.Conversation(model, tok), tok, n)
            conv_ids = torch.tensor([conv.tokens])
            main_dc = DynamicCache()
            with torch.no_grad():
                model(conv_ids, **cache_kwargs(main_dc), use_cache=True)
            main_bytes = conv.memory_bytes()
            for k in subtasks:
                res: Dict[str, dict] = {m: {"time": 0.0, "prefill": 0, "extra": 0, "n": 0}
                                        for m in ("kvloom side path", "re-prefill", "deepcopy", "crop")}

                def record(method, dt, prefill, extra):
                    r = res[method]
                    r["time"] += dt
                    r["prefill"] += prefill
                    r["extra"] = max(r["extra"], extra)
                    r["n"] += 1
                    bar.set_postfix_str(f"{n} tokens, k={k}, {method}: {dt:.2f}s")
                    bar.update(1)

                for i in range(k):
                    instr = SUBTASKS[i % len(SUBTASKS)]
                    full = _render(tok, conv.messages + [{"role": "user", "content": instr}], True)
                    tail = torch.tensor([full[len(conv.tokens):]])
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
                    dt = time.perf_counter() - t0
                    record("deepcopy", dt, tail.shape[1], _kv_bytes(dc))
                    del dc
                    # HF crop: extend the conversation's cache in place, crop back
                    base = _kv_bytes(main_dc)
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        lg = model(tail, **cache_kwargs(main_dc), use_cache=True).logits[:, -1]
                        _decode(model, main_dc, lg, new_tokens)
                    extra = _kv_bytes(main_dc) - base
                    main_dc.crop(-(main_dc.get_seq_length() - conv_ids.shape[1]))
                    record("crop", time.perf_counter() - t0, tail.shape[1], extra)
                    # re-prefill from scratch (its cost does not depend on k: run at most reprefill_max)
                    if i < reprefill_max:
                        t0 = time.perf_counter()
                        dc = DynamicCache()
                        with torch.no_grad():
                            lg = model(torch.tensor([full]), **cache_kwargs(dc), use_cache=True).logits[:, -1]
                            _decode(model, dc, lg, new_tokens)
                        record("re-prefill", time.perf_counter() - t0, len(full), _kv_bytes(dc))
                        del dc
                for method, r in res.items():
                    rows.append({"conversation_tokens": len(conv.tokens), "target_tokens": n, "subtasks": k,
                                 "method": method, "measured_subtasks": r["n"],
                                 "s_per_subtask": r["time"] / r["n"], "prefill_tokens_per_subtask": r["prefill"] / r["n"],
                                 "peak_extra_kv_bytes": r["extra"], "conversation_kv_bytes": main_bytes})
            del conv, main_dc
    for r in rows:
        base = next(x for x in rows if x["target_tokens"] == r["target_tokens"] and x["subtasks"] == r["subtasks"]
                    and x["method"] == "re-prefill")
        r["speedup_vs_reprefill"] = base["s_per_subtask"] / r["s_per_subtask"]
    summary = {"model": model_name or models.DEFAULT_MODEL, "new_tokens": new_tokens, "lengths": lengths,
               "subtasks": subtasks, "reprefill_measured_per_k": reprefill_max,
               "threads": kvloom.get_num_threads(), "rows": rows}
    from ._results import write

    write(out_dir, "sidepath", summary, markdown, plot)
    return summary


def markdown(summary: dict) -> str:
    ks = summary["subtasks"]
    lines = [f"Sub-tasks of {summary['new_tokens']} new tokens on a conversation; seconds per sub-task "
             f"(k sub-tasks per turn: {', '.join(map(str, ks))}), prefill tokens and peak extra KV per sub-task.",
             "", "| conversation tokens | method | " + " | ".join(f"s/sub-task k={k}" for k in ks)
             + " | × re-prefill (k=" + str(ks[-1]) + ") | prefill tokens | peak extra KV MiB |",
             "|---|---|" + "---|" * len(ks) + "---|---|---|"]
    for n in summary["lengths"]:
        for method in ("kvloom side path", "crop", "deepcopy", "re-prefill"):
            rs = {r["subtasks"]: r for r in summary["rows"] if r["target_tokens"] == n and r["method"] == method}
            if not rs:
                continue
            last = rs[ks[-1]]
            lines.append(f"| {last['conversation_tokens']} | {method} | "
                         + " | ".join(f"{rs[k]['s_per_subtask']:.2f}" for k in ks)
                         + f" | {last['speedup_vs_reprefill']:.1f}× | {last['prefill_tokens_per_subtask']:.0f} | "
                         f"{last['peak_extra_kv_bytes'] / 2**20:.1f} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> bool:
    from kvloom._plot import pyplot, save

    plt = pyplot()
    if plt is None:
        return False
    k = summary["subtasks"][-1]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for method in ("kvloom side path", "crop", "deepcopy", "re-prefill"):
        rs = [r for r in summary["rows"] if r["method"] == method and r["subtasks"] == k]
        xs = [r["conversation_tokens"] for r in rs]
        a.plot(xs, [r["s_per_subtask"] for r in rs], marker="o", label=method)
        b.plot(xs, [r["peak_extra_kv_bytes"] / 2**20 for r in rs], marker="o", label=method)
    a.set_xlabel("conversation tokens")
    a.set_ylabel(f"seconds per sub-task (k={k})")
    b.set_xlabel("conversation tokens")
    b.set_ylabel("peak extra KV MiB per sub-task")
    a.legend()
    return save(fig, path, f"{summary['model']}: side paths vs re-prefill vs DynamicCache copies")
