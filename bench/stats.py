"""Prompt statistics: the C++ tiled accumulated attention (H2O, Task-KV) and FastGen's
hybrid recovery vs the same numbers from dense PyTorch (the T x T map materialised), one
layer of SmolLM2's shape (9 query heads, 3 kv heads, head_dim 64), all timed in one run."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

import kvloom
from kvloom import _core


def _median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _dense(q, k, G):
    Hkv, T, D = k.shape
    s = torch.einsum("hgtd,hld->hgtl", q.view(Hkv, G, T, D), k) / D ** 0.5
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1).sum((1, 2))


def run(lengths=(1024, 2048, 4096), repeats: int = 3) -> dict:
    rows = []
    for T in lengths:
        g = torch.Generator().manual_seed(T)
        k, v = torch.randn(3, T, 64, generator=g), torch.randn(3, T, 64, generator=g)
        q = torch.randn(1, 9, T, 64, generator=g)
        cache = kvloom.KVCache(1, 3, 64)
        s = cache.add_sequence()
        cache.append(0, s, k, v)
        row = {"tokens": T}
        row["kvloom_accumulate_s"] = _median_s(lambda: cache.accumulate_attention(0, q, [s]), repeats)
        row["kvloom_recovery_s"] = _median_s(
            lambda: cache.hybrid_recovery(0, q, [s], r_frequent=0.3, local_window=T // 3), repeats)
        _core.force_generic_kernels(True)
        try:
            row["generic_accumulate_s"] = _median_s(lambda: cache.accumulate_attention(0, q, [s]), repeats)
        finally:
            _core.force_generic_kernels(False)
        row["torch_dense_s"] = _median_s(lambda: _dense(q[0], k, 3), repeats)
        row["speedup_vs_dense"] = row["torch_dense_s"] / row["kvloom_accumulate_s"]
        rows.append(row)
        print(f"T={T}: kvloom {row['kvloom_accumulate_s'] * 1e3:.1f} ms, recovery {row['kvloom_recovery_s'] * 1e3:.1f} ms, "
              f"generic {row['generic_accumulate_s'] * 1e3:.1f} ms, torch dense {row['torch_dense_s'] * 1e3:.1f} ms "
              f"({row['speedup_vs_dense']:.1f}x)", flush=True)
    return {"kernel_isa": kvloom.kernel_isa(), "threads": kvloom.get_num_threads(), "rows": rows}


def markdown(summary: dict) -> str:
    lines = [f"Prompt statistics, one layer of SmolLM2's shape (9/3 heads, D 64), {summary['kernel_isa']}, "
             f"{summary['threads']} threads; median seconds",
             "", "| tokens | kvloom accumulate | kvloom recovery | generic kernels | torch dense | dense / kvloom |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in summary["rows"]:
        lines.append(f"| {r['tokens']} | {r['kvloom_accumulate_s']:.4f} | {r['kvloom_recovery_s']:.4f} | "
                     f"{r['generic_accumulate_s']:.4f} | {r['torch_dense_s']:.4f} | {r['speedup_vs_dense']:.1f}x |")
    return "\n".join(lines) + "\n"


def main(out: Path) -> int:
    from kvloom._results import write

    summary = run()
    write(out, "stats", summary, markdown, lambda s, p: False)
    print(markdown(summary))
    return 0
