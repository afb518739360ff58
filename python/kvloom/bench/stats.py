"""Prompt statistics: the C++ tiled accumulated attention (H2O, Task-KV) and FastGen's
hybrid recovery vs the same numbers from dense PyTorch (the T x T map materialised), one
layer of SmolLM2's shape (9 query heads, 3 kv heads, head_dim 64), all timed in one run."""
from __future__ import annotations

import statistics
import time

import torch

from .harness import Benchmark, add_common_options, ints, table


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


class Stats(Benchmark):
    name = "stats"
    help = "prompt statistics (H2O / FastGen / Task-KV profiling): tiled C++ vs dense torch"

    def add_options(self, p) -> None:
        add_common_options(p, model=False)
        p.add_argument("--lengths", type=ints, default=[1024, 2048, 4096], help="prompt tokens (default 1024,2048,4096)")
        p.add_argument("--repeats", type=int, default=3, help="timed repeats per case (median)")

    def run(self, args) -> dict:
        import kvloom

        rows = self.grid(args.lengths, lambda T: self._case(T, args.repeats), unit="length",
                         postfix=lambda T, r: f"T={T}: {r['speedup_vs_dense']:.1f}x dense")
        return {"kernel_isa": kvloom.kernel_isa(), "threads": kvloom.get_num_threads(), "rows": rows}

    @staticmethod
    def _case(T: int, repeats: int) -> dict:
        import kvloom
        from kvloom import _core
        from kvloom.policies.fastgen import hybrid_recovery

        g = torch.Generator().manual_seed(T)
        k, v = torch.randn(3, T, 64, generator=g), torch.randn(3, T, 64, generator=g)
        q = torch.randn(1, 9, T, 64, generator=g)
        cache = kvloom.KVCache(1, 3, 64)
        s = cache.add_sequence()
        cache.append(0, s, k, v)
        row = {"tokens": T}
        row["kvloom_accumulate_s"] = _median_s(lambda: cache.accumulate_attention(0, q, [s]), repeats)
        row["kvloom_recovery_s"] = _median_s(
            lambda: hybrid_recovery(cache, 0, q, [s], r_frequent=0.3, local_window=T // 3), repeats)
        row["kvloom_fastgen_prompt_s"] = _median_s(  # what FastGen's prompt runs: both, from one pass
            lambda: hybrid_recovery(cache, 0, q, [s], r_frequent=0.3, local_window=T // 3, accumulate=True), repeats)
        _core.force_generic_kernels(True)
        try:
            row["generic_accumulate_s"] = _median_s(lambda: cache.accumulate_attention(0, q, [s]), repeats)
        finally:
            _core.force_generic_kernels(False)
        row["torch_dense_s"] = _median_s(lambda: _dense(q[0], k, 3), repeats)
        row["speedup_vs_dense"] = row["torch_dense_s"] / row["kvloom_accumulate_s"]
        return row

    def markdown(self, summary: dict) -> str:
        head = (f"Prompt statistics, one layer of SmolLM2's shape (9/3 heads, D 64), {summary['kernel_isa']}, "
                f"{summary['threads']} threads; median seconds\n\n")
        rows = [[r["tokens"], f"{r['kvloom_accumulate_s']:.4f}", f"{r['kvloom_recovery_s']:.4f}",
                 f"{r['kvloom_fastgen_prompt_s']:.4f}", f"{r['generic_accumulate_s']:.4f}", f"{r['torch_dense_s']:.4f}",
                 f"{r['speedup_vs_dense']:.1f}x"]
                for r in summary["rows"]]
        return head + table(["tokens", "kvloom accumulate", "kvloom recovery", "both in one pass (FastGen)",
                             "generic kernels", "torch dense", "dense / kvloom"], rows, align="rrrrrrr")


BENCH = Stats()
