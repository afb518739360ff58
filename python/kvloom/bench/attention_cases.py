"""Kernel micro-benchmarks under pytest-benchmark: kvloom decode attention vs torch SDPA on
the same inputs, and the machine's read bandwidth, all in one run.

Run through `kvloom bench attention` (writes the JSON, table and plot), or directly:
    pytest --pyargs kvloom.bench.attention_cases --benchmark-json=out.json
"""
import os

import pytest
import torch

import kvloom

from kvloom.bench.grids import ATTENTION, CHUNK, PROBE_BYTES, QUANT, QUICK

CASES = [c for c in ATTENTION if os.environ.get("KVLOOM_BENCH_QUICK") != "1" or c["name"] in QUICK]
DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="session", autouse=True)
def same_threads():
    n = int(os.environ.get("KVLOOM_BENCH_THREADS", "0")) or kvloom.get_num_threads()
    kvloom.set_num_threads(n)
    torch.set_num_threads(n)
    yield n


def _inputs(c, seed=0):
    g = torch.Generator().manual_seed(seed)
    dt = DT[c["dtype"]]
    q = torch.randn(c["B"], c["Hq"], c["D"], generator=g).to(dt)
    k = torch.randn(c["B"], c["Hkv"], c["T"], c["D"], generator=g).to(dt)
    v = torch.randn(c["B"], c["Hkv"], c["T"], c["D"], generator=g).to(dt)
    return q, k, v


def _kv_bytes(c):
    return 2 * c["B"] * c["Hkv"] * c["T"] * c["D"] * torch.empty(0, dtype=DT[c["dtype"]]).element_size()


def _last_level_cache_bytes() -> int:
    """The CPU's largest cache (Linux sysfs), 32 MiB when it cannot be read."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            with open(os.path.join(base, idx, "size")) as f:
                txt = f.read().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:], 1)
            best = max(best, int(txt.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best or 32 << 20


def _rotating(make, bytes_each: int, limit: int = 64, first=None):
    """A decode step reads KV that is not in the CPU's caches (the other layers' KV evicted it),
    so each timed call reads the next of enough copies to cover twice the last-level cache
    (at most `limit`; small cases stay cache-resident and are latency-bound anyway).
    `first`, if given, is make(0) already built. Returns (list of inputs, a function that
    yields them in turn)."""
    n = max(1, min(limit, -(-2 * _last_level_cache_bytes() // max(1, bytes_each))))
    sets = [first if i == 0 and first is not None else make(i) for i in range(n)]
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % n
        return sets[state["i"]]

    return sets, nxt


def _probe(benchmark, at: str):
    buf = torch.ones(PROBE_BYTES // 4)
    benchmark.extra_info.update(case=f"read-bandwidth-{at}", impl="probe", bytes=PROBE_BYTES)
    benchmark.pedantic(lambda: kvloom._core.read_probe(buf), rounds=15, warmup_rounds=2, iterations=1)


def test_read_bandwidth_first(benchmark):
    """The streaming-read probe before the cases (and again after them: the summary keeps the
    faster, since a disturbed machine only reads slower)."""
    _probe(benchmark, "first")


@pytest.mark.parametrize("impl", ["kvloom", "sdpa"])
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_decode_attention(benchmark, case, impl):
    sets, nxt = _rotating(lambda i: _inputs(case, i), _kv_bytes(case))
    if impl == "kvloom":
        def fn():
            q, k, v = nxt()
            return kvloom.ops.decode_attention(q, k, v)
    else:
        def fn():
            q, k, v = nxt()
            return torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True)
    # the two must agree before their speed means anything
    q, k, v = sets[(1 % len(sets))]
    ref = torch.nn.functional.scaled_dot_product_attention(q.float().unsqueeze(2), k.float(), v.float(),
                                                           enable_gqa=True).squeeze(2)
    torch.testing.assert_close(fn().float().reshape(ref.shape), ref, atol=2e-2, rtol=2e-2)
    benchmark.extra_info.update(case=case["name"], impl=impl, kv_bytes=_kv_bytes(case), copies=len(sets), **case)
    benchmark.pedantic(fn, rounds=int(os.environ.get("KVLOOM_BENCH_ROUNDS", "30")), warmup_rounds=3, iterations=1)


@pytest.mark.parametrize("impl", ["kvloom", "fp32"])
@pytest.mark.parametrize("case", QUANT, ids=[c["name"] for c in QUANT])
def test_quantized_attention(benchmark, case, impl):
    def make(i):
        g = torch.Generator().manual_seed(i)
        q = torch.randn(case["B"], case["Hq"], case["D"], generator=g)
        k = torch.randn(case["B"], case["Hkv"], case["T"], case["D"], generator=g)
        v = torch.randn(case["B"], case["Hkv"], case["T"], case["D"], generator=g)
        qkv = kvloom.ops.quantize_kv(k, v, case["bits"], case["block_size"])
        return (q, qkv) if impl == "kvloom" else (q, *kvloom.ops.dequantize_kv(qkv))  # fp32: the same values

    fp32_bytes = 2 * case["B"] * case["Hkv"] * case["T"] * case["D"] * 4
    first = make(0)
    nbytes = first[1].nbytes if impl == "kvloom" else fp32_bytes
    sets, nxt = _rotating(make, nbytes, first=first)
    fn = lambda: kvloom.ops.decode_attention(*nxt())  # noqa: E731
    q, *kv = sets[1 % len(sets)]
    kk, vv = kvloom.ops.dequantize_kv(kv[0]) if impl == "kvloom" else kv
    torch.testing.assert_close(fn(), kvloom.ops.decode_attention(q, kk, vv), atol=1e-5, rtol=1e-4)
    benchmark.extra_info.update(case=case["name"], impl=impl, kv_bytes=nbytes, copies=len(sets), **case)
    benchmark.pedantic(fn, rounds=int(os.environ.get("KVLOOM_BENCH_ROUNDS", "30")), warmup_rounds=3, iterations=1)


@pytest.mark.parametrize("impl", ["kvloom", "python", "sdpa"])
@pytest.mark.parametrize("case", CHUNK, ids=[c["name"] for c in CHUNK])
def test_chunk_attention(benchmark, case, impl):
    """A chunk of Tq tokens over T cached ones: kvloom's C++ chunk attention, the gathering path
    (per-head gather, padded keys, a mask, torch SDPA: what long chunks on CUDA caches take), and
    SDPA over a dense cache."""
    g = torch.Generator().manual_seed(0)
    Hq, Hkv, T, Tq, D = case["Hq"], case["Hkv"], case["T"], case["Tq"], case["D"]
    k, v = torch.randn(Hkv, T + Tq, D, generator=g), torch.randn(Hkv, T + Tq, D, generator=g)
    q = torch.randn(1, Hq, Tq, D, generator=g)
    cache = kvloom.KVCache(1, Hkv, D)
    s = cache.add_sequence()
    cache.append(0, s, k, v)
    mask = torch.ones(Tq, T + Tq, dtype=torch.bool).tril(T)[None, None]  # [1, 1, Tq, T + Tq]: causal
    if impl == "kvloom":
        fn = lambda: cache.chunk_attention(0, q, [s], scale=D ** -0.5)  # noqa: E731
    elif impl == "python":
        fn = lambda: cache._chunk_by_gather(0, q, [s], None, D ** -0.5)  # noqa: E731
    else:
        kd, vd = k[None], v[None]
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, kd, vd, attn_mask=mask, enable_gqa=True)  # noqa: E731
    benchmark.extra_info.update(case=case["name"], impl=impl, kv_bytes=2 * Hkv * (T + Tq) * D * 4, B=1, **case)
    benchmark.pedantic(fn, rounds=int(os.environ.get("KVLOOM_BENCH_ROUNDS", "30")), warmup_rounds=3, iterations=1)


def test_read_bandwidth_last(benchmark):
    _probe(benchmark, "last")
