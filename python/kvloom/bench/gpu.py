"""GPU benchmark (`kvloom bench gpu`, run by bench/gpu_check.sh on a GPU machine).

1. Decode attention, one token, bf16: kvloom over its paged cache vs torch SDPA over the same
   keys/values held densely, Hq 32 / Hkv 8 / D 128, T 4k/32k/128k, batch 1 and 8; the achieved
   KV read rate against a device-to-device copy measured in the same run (the copy reads and
   writes: its bandwidth is 2 x bytes / time). Also the host time per kvloom call (issued
   back to back, no synchronisation), the GPU-busy time per call (kernels and copies, from
   torch.profiler) and kvloom's kernel over the dense tensors (no paging).
2. End to end: decode tokens/s and KV bytes of kvloom.Cache (Full, Window 50%, FastGen) vs
   DynamicCache + sdpa on a random-initialised Llama of Llama-3.2-1B's shape in bf16, at 8k
   context, batch 1 and 8 (random weights: only speed and memory mean anything).

All times are CUDA-event medians after warm-up, every ratio from the same run.
"""
from __future__ import annotations

import statistics
import time
from typing import Optional

import torch

from .harness import Benchmark, add_common_options, ints, table


def _cuda_time(fn, reps: int, warmup: int = 3) -> float:
    """Median seconds of fn() on the current stream (CUDA events)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def _host_time(fn, reps: int) -> float:
    """Median-free host seconds per call of fn() with no synchronisation between calls: what the
    CPU spends issuing one call (when it exceeds the GPU time, the call is host-bound)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / reps


def _kernel_time(fn, reps: int = 10):
    """GPU seconds per call of fn() spent in kernels and copies (torch.profiler, CUPTI), or None
    where the profiler gives no device times: the part of a call's time the GPU is busy."""
    try:
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
        total = sum(getattr(e, "self_device_time_total", 0.0) for e in prof.key_averages())  # µs
        return total / reps / 1e6 if total > 0 else None
    except Exception:  # (a profiler that cannot start must not cost the benchmark)
        return None


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    t = _cuda_time(lambda: dst.copy_(src), reps)
    return 2 * nbytes / t


def attention_case(B: int, T: int, Hq: int = 32, Hkv: int = 8, D: int = 128, reps: int = 20,
                   kv_dtype: Optional[str] = None) -> dict:
    import kvloom

    g = torch.Generator(device="cuda").manual_seed(T + B)
    kv = kvloom.KVCache(1, Hkv, D, dtype=torch.bfloat16, device="cuda", block_size=32 if kv_dtype else 16,
                        kv_dtype=kv_dtype)
    k = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    seqs = [kv.add_sequence() for _ in range(B)]
    for b, s in enumerate(seqs):
        kv.append(0, s, k[b], v[b])
    q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16, generator=g)
    got = kv.attend(0, q, seqs)
    want = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]
    err = float((got.float() - want.float()).abs().max())
    t_kv = _cuda_time(lambda: kv.attend(0, q, seqs), reps)
    host_kv = _host_time(lambda: kv.attend(0, q, seqs), reps)
    gpu_kv = _kernel_time(lambda: kv.attend(0, q, seqs))
    # the same kernel over the dense tensors: no block tables, no paging (kernel vs paging cost)
    t_dense = _cuda_time(lambda: kvloom.ops.decode_attention(q, k, v), reps)
    q4 = q[:, :, None]
    t_sdpa = _cuda_time(lambda: torch.nn.functional.scaled_dot_product_attention(q4, k, v, enable_gqa=True), reps)
    nbytes = kv.memory_bytes() if kv_dtype else 2 * B * Hkv * T * D * 2
    kv = k = v = None  # (the lambdas above hold them as cells)
    torch.cuda.empty_cache()
    return {"B": B, "T": T, "Hq": Hq, "Hkv": Hkv, "D": D, "kv_dtype": kv_dtype or "bf16", "kv_bytes": nbytes, "kvloom_us": t_kv * 1e6,
            "kvloom_host_us": host_kv * 1e6, "kvloom_gpu_us": gpu_kv * 1e6 if gpu_kv else None, "dense_us": t_dense * 1e6, "sdpa_us": t_sdpa * 1e6,
            "speedup": t_sdpa / t_kv, "kvloom_gbps": nbytes / t_kv / 1e9, "max_abs_err": err}


def llama_1b(device="cuda"):
    """A random-initialised Llama with Llama-3.2-1B's shape, bf16, on the GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                      rope_theta=500000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model.set_attn_implementation("sdpa")
    return model.to(torch.bfloat16).eval()


class _Tok:
    """FastGen needs token classes; random weights have no tokenizer: ids 0..9 are 'special'."""
    all_special_ids = list(range(10))

    def __len__(self):
        return 0

    def decode(self, ids):
        return ""


def e2e_case(model, name: str, B: int, context: int, new_tokens: int) -> dict:
    import kvloom
    from kvloom.hf import cache_kwargs
    from transformers import DynamicCache

    ids = torch.randint(10, 32000, (B, context), device="cuda", generator=torch.Generator(device="cuda").manual_seed(B))
    if name == "dynamic+sdpa":
        model.set_attn_implementation("sdpa")
        cache = DynamicCache()
    else:
        kvloom.enable(model)
        policy = {"kvloom full": None, "kvloom window 50%": kvloom.Window(4, context // 2 - 4),
                  "kvloom fastgen 0.95": kvloom.FastGen(0.95)}[name]
        cache = kvloom.Cache(model, policy=policy, tokenizer=_Tok())
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(ids, **cache_kwargs(cache), use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            nxt = model(nxt, **cache_kwargs(cache), use_cache=True).logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    if hasattr(cache, "memory_bytes"):
        kv_bytes = cache.memory_bytes()
    else:
        kv_bytes = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    row = {"cache": name, "batch": B, "context": context, "prefill_s": t1 - t0,
           "decode_tok_s": B * new_tokens / (t2 - t1), "kv_bytes": int(kv_bytes)}
    del cache, out
    torch.cuda.empty_cache()
    return row


class GPU(Benchmark):
    name = "gpu"
    help = "GPU: decode attention vs SDPA and a D2D copy; end-to-end kvloom.Cache vs DynamicCache on a 1B Llama"

    def add_options(self, p) -> None:
        add_common_options(p, model=False)
        p.add_argument("--lengths", type=ints, default=[4096, 32768, 131072], help="KV tokens for the kernel rows")
        p.add_argument("--batches", type=ints, default=[1, 8], help="batch sizes")
        p.add_argument("--context", type=int, default=8192, help="end-to-end prompt tokens")
        p.add_argument("--new-tokens", type=int, default=32, help="end-to-end decoded tokens per run")
        p.add_argument("--reps", type=int, default=20, help="timed repetitions per kernel case (median)")
        p.add_argument("--quant-lengths", type=ints, default=[4096, 32768],
                       help="KV tokens for the quantized-cache rows (int8, int4; batch 1)")
        p.add_argument("--skip-e2e", action="store_true", help="only the kernel rows")

    def run(self, args) -> dict:
        if not torch.cuda.is_available():
            raise RuntimeError("kvloom bench gpu needs a CUDA device")
        import kvloom

        if not kvloom._core.cuda_built:
            raise RuntimeError("this kvloom was built without CUDA")
        bw = copy_bandwidth()
        cases = [(B, T) for T in args.lengths for B in args.batches]
        rows = self.grid(cases, lambda c: attention_case(c[0], c[1], reps=args.reps), unit="case",
                         postfix=lambda c, r: f"B{c[0]} T{c[1]}: {r['speedup']:.2f}x SDPA")
        for r in rows:
            r["bw_fraction"] = r["kvloom_gbps"] * 1e9 / bw
        # quantized caches (issue 15): the same decode step over int8 / int4 blocks, against the
        # bf16 cache's time at the same shape (measured alongside when the grid lacks it)
        qcases = [(T, dt) for T in args.quant_lengths for dt in ("int8", "int4")]
        quant = self.grid(qcases, lambda c: attention_case(1, c[0], reps=args.reps, kv_dtype=c[1]), unit="case",
                          postfix=lambda c, r: f"{c[1]} T{c[0]}: {r['kvloom_us']:.0f} us")
        for r in quant:
            base = next((x for x in rows if x["B"] == 1 and x["T"] == r["T"]), None)
            if base is None:
                base = attention_case(1, r["T"], reps=args.reps)
                rows.append(base)
                base["bw_fraction"] = base["kvloom_gbps"] * 1e9 / bw
            r["bf16_us"] = base["kvloom_us"]
            r["vs_bf16"] = base["kvloom_us"] / r["kvloom_us"]
        e2e = []
        if not args.skip_e2e:
            model = llama_1b()
            names = ["dynamic+sdpa", "kvloom full", "kvloom window 50%", "kvloom fastgen 0.95"]
            # warm-up, untimed: each cache's first run loads its kernels and picks cuBLAS plans (the
            # first timed run of the 2026-12-05 check, DynamicCache at batch 1, paid for them)
            for n in names:
                e2e_case(model, n, 1, min(512, args.context), 2)
            work = [(n, B) for B in args.batches for n in names]
            e2e = self.grid(work, lambda w: e2e_case(model, w[0], w[1], args.context, args.new_tokens), unit="run",
                            postfix=lambda w, r: f"{w[0]} B{w[1]}: {r['decode_tok_s']:.0f} tok/s")
            for r in e2e:
                base = next(x for x in e2e if x["batch"] == r["batch"] and x["cache"] == "dynamic+sdpa")
                r["decode_vs_dynamic"] = r["decode_tok_s"] / base["decode_tok_s"]
                r["kv_vs_dynamic"] = r["kv_bytes"] / base["kv_bytes"]
        props = torch.cuda.get_device_properties(0)
        return {"device": props.name, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                "cuda_archs": kvloom._core.cuda_architectures(), "copy_bandwidth_gbps": bw / 1e9, "rows": rows,
                "quantized": quant, "e2e": e2e}

    def markdown(self, summary: dict) -> str:
        head = (f"{summary['device']}, {summary['date']} (torch {summary['torch']}, kvloom built for "
                f"sm_{summary['cuda_archs']}); device-to-device copy: {summary['copy_bandwidth_gbps']:.0f} GB/s\n\n"
                "Decode attention, one token, bf16, Hq 32 / Hkv 8 / D 128:\n\n")
        def opt(r, key):  # (columns added after the first run's results, or not measured)
            return f"{r[key]:.0f}" if r.get(key) is not None else "–"

        rows = [[r["B"], r["T"], f"{r['kvloom_us']:.0f}", opt(r, "kvloom_host_us"), opt(r, "kvloom_gpu_us"),
                 opt(r, "dense_us"),
                 f"{r['sdpa_us']:.0f}", f"{r['speedup']:.2f}×", f"{r['kvloom_gbps']:.0f}",
                 f"{100 * r['bw_fraction']:.0f}%", f"{r['max_abs_err']:.1e}"]
                for r in summary["rows"]]
        out = head + table(["batch", "T", "kvloom µs", "host µs/call", "GPU-busy µs", "dense µs", "SDPA µs", "× SDPA",
                            "kvloom GB/s", "% of copy BW", "max |err|"], rows)
        if summary.get("quantized"):
            out += ("\nQuantized caches (kv_dtype; batch 1, same shape), against the bf16 cache:\n\n"
                    + table(["kv_dtype", "T", "KV bytes × bf16", "kvloom µs", "bf16 cache µs", "× bf16", "max abs err vs SDPA (unquantized KV)"],
                            [[r["kv_dtype"], r["T"], f"{r['kv_bytes'] / (2 * r['T'] * r['Hkv'] * r['D'] * 2):.3f}",
                              f"{r['kvloom_us']:.0f}", f"{r['bf16_us']:.0f}", f"{r['vs_bf16']:.2f}×",
                              f"{r['max_abs_err']:.1e}"] for r in summary["quantized"]]))
        if summary["e2e"]:
            e = summary["e2e"]
            out += (f"\nEnd to end, random-init Llama-3.2-1B shape, bf16, {e[0]['context']} tokens of context:\n\n"
                    + table(["batch", "cache", "prefill s", "decode tok/s", "× DynamicCache", "KV GiB",
                             "KV × DynamicCache"],
                            [[r["batch"], r["cache"], f"{r['prefill_s']:.2f}", f"{r['decode_tok_s']:.1f}",
                              f"{r['decode_vs_dynamic']:.2f}×", f"{r['kv_bytes'] / 2**30:.2f}",
                              f"{r['kv_vs_dynamic']:.2f}×"] for r in e]))
        return out


BENCH = GPU()
