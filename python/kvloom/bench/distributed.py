"""Past one process (`kvloom bench distributed`), two parts in one run:

* tensor parallelism: the model's heads sharded over 1, 2 and 3 processes (transformers'
  ``tp_plan="auto"``, gloo, one thread per process); per-rank and total KV bytes, prefill
  seconds and decode tokens/s of DynamicCache + sdpa and of kvloom.Cache policies, and whether
  the greedy tokens equal the one-process run's;
* KV transfer: rank 0 prefills, sends the cache (``kvloom.distributed.send_cache``), rank 1
  receives and decodes; bytes on the wire and seconds, for Full and for compressed caches,
  and whether the receiver's tokens equal those the sender decodes itself.

The processes are started by this benchmark, ranked through the environment as torchrun does;
each runs :func:`worker` and rank 0 writes what the ranks measured.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

import torch

from ..hf.compat import cache_kwargs
from .harness import Benchmark, add_common_options, ints, table, words


def launch(argv: List[str], world: int, timeout: float = 1800) -> List[str]:
    """Runs `world` local processes of ``python argv...``, ranked through RANK/WORLD_SIZE/
    MASTER_ADDR/MASTER_PORT as torchrun does but without its elastic agent (a rank that ends
    early does not take the others down); returns their outputs. Raises with the output of
    every rank if one fails."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs, logs = [], []
    try:
        for rank in range(world):
            env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "WORLD_SIZE": str(world),
                   "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port)}
            # a file, not a pipe: a rank blocked on a full pipe would stall the others' collectives
            logs.append(tempfile.TemporaryFile(mode="w+"))
            procs.append(subprocess.Popen([sys.executable, *argv], env=env, stdout=logs[-1], stderr=subprocess.STDOUT,
                                          text=True))
        deadline, late = time.monotonic() + timeout, False
        try:
            for p in procs:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            late = True
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        outs = []
        for f in logs:
            f.seek(0)
            outs.append(f.read())
            f.close()
    if late or any(p.returncode for p in procs):
        what = f"timed out after {timeout:g} s" if late else "a process failed"
        raise RuntimeError(what + ":\n" + "\n".join(f"--- rank {r} (exit {p.returncode}):\n{o[-3000:]}"
                                                     for r, (p, o) in enumerate(zip(procs, outs))))
    return outs


# --- what runs in each process ----------------------------------------------------------
SETTINGS = {  # name -> (label, kvloom.Cache keywords from the prompt length, or None for DynamicCache)
    "dynamic": ("DynamicCache + sdpa", None),
    "full": ("kvloom Full", lambda n: {}),
    "window": ("kvloom Window 25%", lambda n: {"policy": ("window", {"sinks": 4, "recent": max(8, n // 4) - 4})}),
    "window_int4": ("kvloom Window 25% int4", lambda n: {"policy": ("window", {"sinks": 4, "recent": max(8, n // 4) - 4}),
                                                        "kv_dtype": "int4"}),
    "budget": ("kvloom Full, kv_budget 0.25", lambda n: {"kv_budget": 0.25}),
    "taskkv": ("kvloom Task-KV 40%", lambda n: {"policy": ("taskkv", {"beta": 0.0, "m": 0, "sinks": 4, "recent": 32,
                                                                      "budget": 0.4})}),
}


def _cache(model, tok, name: str, n: int):
    import kvloom
    from transformers import DynamicCache

    kw = SETTINGS[name][1]
    if kw is None:
        return DynamicCache()
    kw = dict(kw(n))
    if "policy" in kw:
        pname, values = kw["policy"]
        kw["policy"] = kvloom.policies.make(pname, **values)
    return kvloom.Cache(model, tokenizer=tok, **kw)


@torch.no_grad()
def _decode(model, cache, nxt, n: int):
    toks = []
    t0 = time.perf_counter()
    for _ in range(n):
        nxt = model(nxt, **cache_kwargs(cache), use_cache=True).logits[:, -1:].argmax(-1)
        toks.append(int(nxt))
    return toks, time.perf_counter() - t0


@torch.no_grad()
def _prefill(model, cache, ids):
    t0 = time.perf_counter()
    nxt = model(ids, **cache_kwargs(cache), use_cache=True).logits[:, -1:].argmax(-1)
    return nxt, time.perf_counter() - t0


def worker(config_path: str) -> None:
    import torch.distributed as dist

    import kvloom
    from kvloom import distributed as kd
    from kvloom import models

    from ..hf.compat import tensor_parallel_kwargs
    from .e2e import essay_ids, kv_bytes

    cfg = json.loads(Path(config_path).read_text())
    torch.set_num_threads(1)
    kvloom.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    tp = cfg["part"] == "tp" and world > 1
    model, tok = models.load(cfg["model"], **(tensor_parallel_kwargs() if tp else {}))
    kvloom.enable(model)
    ids = essay_ids(tok, cfg["context"])
    rows = []
    if cfg["part"] == "tp":
        for name in cfg["settings"]:
            model.set_attn_implementation("sdpa" if SETTINGS[name][1] is None else "kvloom")
            best = None
            for _ in range(cfg["repeats"]):
                cache = _cache(model, tok, name, ids.shape[1])
                if world > 1:
                    dist.barrier()
                nxt, prefill = _prefill(model, cache, ids)
                toks, dt = _decode(model, cache, nxt, cfg["new_tokens"])
                mine = kv_bytes(cache)
                per_rank = [mine] if world == 1 else [None] * world
                if world > 1:
                    dist.all_gather_object(per_rank, mine)
                res = {"setting": name, "prefill_s": prefill, "decode_tok_s": cfg["new_tokens"] / dt,
                       "rank_bytes": per_rank, "tokens": toks}
                if best is None or res["decode_tok_s"] > best["decode_tok_s"]:
                    best = {**res, "prefill_s": min(prefill, best["prefill_s"]) if best else prefill}
            rows.append(best)
    else:  # transfer: rank 0 prefills and sends, rank 1 receives and decodes
        for name in cfg["settings"]:
            cache = _cache(model, tok, name, ids.shape[1])
            dist.barrier()
            if rank == 0:
                nxt, prefill = _prefill(model, cache, ids)
                held = cache.memory_bytes()
                dist.barrier()  # the receiver starts its clock here
                t0 = time.perf_counter()
                wire = kd.send_cache(cache, 1, extra={"next": int(nxt)})
                sent_s = time.perf_counter() - t0
                toks, _ = _decode(model, cache, nxt, cfg["new_tokens"])  # what it would have decoded
                info = {"prefill_s": prefill, "wire_bytes": wire, "send_s": sent_s, "held": held, "tokens": toks}
            else:
                dist.barrier()
                t0 = time.perf_counter()
                got, extra = kd.recv_cache(model, 0, tokenizer=tok)
                recv_s = time.perf_counter() - t0
                held = got.memory_bytes()
                toks, _ = _decode(model, got, torch.tensor([[extra["next"]]]), cfg["new_tokens"])
                info = {"recv_s": recv_s, "tokens": toks, "held": held}
            both = [None, None]
            dist.all_gather_object(both, info)
            s, r = both
            rows.append({"setting": name, "prefill_s": s["prefill_s"], "wire_bytes": s["wire_bytes"],
                         "send_s": s["send_s"], "recv_s": r["recv_s"], "held_bytes": s["held"],
                         "same_held": s["held"] == r["held"], "same_tokens": s["tokens"] == r["tokens"]})
    if rank == 0:
        Path(cfg["out"]).write_text(json.dumps({"world": world, "rows": rows}))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


# --- the benchmark ------------------------------------------------------------------------
class DistributedBench(Benchmark):
    name = "distributed"
    help = "tensor parallelism over 1-3 processes and prefill->decode KV transfer (torch.distributed, gloo)"

    def add_options(self, p) -> None:
        add_common_options(p)
        p.add_argument("--procs", type=ints, default=[1, 2, 3], help="process counts for tensor parallelism "
                       "(each must divide the model's kv heads; default 1,2,3 fits SmolLM2 only where it divides)")
        p.add_argument("--context", type=int, default=2048, help="prompt tokens (default 2048)")
        p.add_argument("--new-tokens", type=int, default=32, help="decoded tokens per run (default 32)")
        p.add_argument("--repeats", type=int, default=2, help="repeats per case, best kept (default 2)")
        p.add_argument("--tp-settings", type=words, default=["dynamic", "full", "window", "budget", "taskkv"],
                       help=f"caches under tensor parallelism ({', '.join(SETTINGS)})")
        p.add_argument("--transfer-settings", type=words, default=["full", "window", "window_int4", "taskkv"],
                       help=f"caches sent from prefill to decode ({', '.join(s for s in SETTINGS if s != 'dynamic')})")

    def run(self, args) -> dict:
        from tqdm import tqdm

        from kvloom import models
        from kvloom.hf import arch

        for opt, names in (("--tp-settings", args.tp_settings), ("--transfer-settings", args.transfer_settings)):
            bad = [n for n in names if n not in SETTINGS or (opt == "--transfer-settings" and n == "dynamic")]
            if bad:
                raise ValueError(f"{opt}: unknown {', '.join(bad)}; choose from {', '.join(SETTINGS)}")
        if any(n < 1 for n in args.procs):
            raise ValueError("--procs: process counts must be >= 1")
        from transformers import AutoConfig

        path, kw = models.resolve(args.model)
        geo = arch.geometry(AutoConfig.from_pretrained(path, **kw))
        procs = [n for n in args.procs if geo.n_kv_heads % n == 0 and geo.n_q_heads % n == 0]
        skipped = [n for n in args.procs if n not in procs]
        runs = [("tp", n, args.tp_settings) for n in procs] + [("transfer", 2, args.transfer_settings)]
        parts = {}
        with tempfile.TemporaryDirectory() as tmp, tqdm(total=len(runs), desc="kvloom bench distributed",
                                                       unit="job") as bar:
            for part, world, settings in runs:
                out = Path(tmp) / f"{part}{world}.json"
                cfg = Path(tmp) / f"{part}{world}.cfg.json"
                cfg.write_text(json.dumps({"part": part, "model": args.model, "context": args.context,
                                           "new_tokens": args.new_tokens, "repeats": args.repeats,
                                           "settings": settings, "out": str(out)}))
                launch(["-m", __name__, str(cfg)], world)
                parts[(part, world)] = json.loads(out.read_text())["rows"]
                bar.set_postfix_str(f"{part} x{world} done")
                bar.update(1)
        tp_rows = []
        single = {r["setting"]: r for r in parts.get(("tp", 1), [])}
        for n in procs:
            for r in parts[("tp", n)]:
                one = single.get(r["setting"])
                tp_rows.append({"procs": n, "setting": r["setting"], "cache": SETTINGS[r["setting"]][0],
                                "prefill_s": r["prefill_s"], "decode_tok_s": r["decode_tok_s"],
                                "rank_bytes": r["rank_bytes"], "total_bytes": sum(r["rank_bytes"]),
                                "speedup": r["decode_tok_s"] / one["decode_tok_s"] if one else None,
                                "same_tokens": r["tokens"] == one["tokens"] if one else None})
        full_wire = next((r["wire_bytes"] for r in parts[("transfer", 2)] if r["setting"] == "full"), None)
        transfer_rows = [{**r, "cache": SETTINGS[r["setting"]][0],
                          "wire_vs_full": r["wire_bytes"] / full_wire if full_wire else None}
                         for r in parts[("transfer", 2)]]
        return {"model": args.model or models.DEFAULT_MODEL, "context": args.context, "new_tokens": args.new_tokens,
                "repeats": args.repeats, "cores": os.cpu_count(), "threads_per_process": 1, "skipped_procs": skipped,
                "rows": tp_rows, "transfer": transfer_rows}

    def markdown(self, summary: dict) -> str:
        def mib(b):
            return f"{b / 2**20:.1f}"

        def yes(v):
            return "—" if v is None else ("yes" if v else "**no**")

        head = (f"{summary['model']}, {summary['context']}-token prompt, {summary['new_tokens']} greedy tokens, one "
                f"thread per process on {summary['cores']} cores, gloo\n\n")
        tp = table(["processes", "cache", "KV MiB per rank", "KV MiB total", "prefill s", "decode tok/s",
                    "× 1 process", "tokens = 1 process"],
                   [[r["procs"], r["cache"], " / ".join(mib(b) for b in r["rank_bytes"]), mib(r["total_bytes"]),
                     f"{r['prefill_s']:.2f}", f"{r['decode_tok_s']:.1f}",
                     "—" if r["speedup"] is None else f"{r['speedup']:.2f}×", yes(r["same_tokens"])]
                    for r in summary["rows"]], "rlrrrrrl")
        skipped = (f"\n(not run: {', '.join(map(str, summary['skipped_procs']))} processes do not divide the heads)\n"
                   if summary["skipped_procs"] else "")
        tr = table(["cache sent after prefill", "KV MiB held", "bytes on the wire", "wire × Full", "send s",
                    "receive + rebuild s", "decode continues identically"],
                   [[r["cache"], mib(r["held_bytes"]), f"{r['wire_bytes']:,}",
                     "—" if r["wire_vs_full"] is None else f"{r['wire_vs_full']:.3f}", f"{r['send_s']:.3f}",
                     f"{r['recv_s']:.3f}", yes(r["same_tokens"] and r["same_held"])]
                    for r in summary["transfer"]], "lrrrrrl")
        return head + "Tensor parallelism:\n\n" + tp + skipped + "\nPrefill → decode transfer (2 processes):\n\n" + tr

    def draw(self, summary: dict, plt):
        rows = summary["rows"]
        if not rows:
            return None
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        for name in dict.fromkeys(r["cache"] for r in rows):
            rs = [r for r in rows if r["cache"] == name]
            a.plot([r["procs"] for r in rs], [r["decode_tok_s"] for r in rs], marker="o", label=name)
            b.plot([r["procs"] for r in rs], [max(r["rank_bytes"]) / 2**20 for r in rs], marker="o", label=name)
        a.set_xlabel("processes")
        a.set_ylabel("decode tokens/s")
        b.set_xlabel("processes")
        b.set_ylabel("KV MiB on the largest rank")
        a.legend(fontsize=7)
        return fig, f"{summary['model']}: tensor parallelism on the CPU"


BENCH = DistributedBench()

if __name__ == "__main__":
    worker(sys.argv[1])
