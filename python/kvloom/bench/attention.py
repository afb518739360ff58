"""Decode attention, one token: kvloom's kernel vs torch SDPA on the same inputs (GQA/MQA/MHA,
fp32/fp16/bf16, the grid in ``grids.py``), and the machine's read bandwidth measured in the
same run with the same threads. The cases run under pytest-benchmark (calibrated rounds; its
raw JSON is kept beside the results for ``--benchmark-compare``)."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .grids import QUANT_TARGET, TARGETS
from .harness import Benchmark, add_common_options, table


def summarize(raw: dict) -> dict:
    by_case: dict = {}
    probes = []  # each streaming-read probe of the run (bytes/s); the faster one is the machine's
    for b in raw["benchmarks"]:
        info = b["extra_info"]
        med = b["stats"]["median"]
        if info["impl"] == "probe":
            probes.append(info["bytes"] / med)
            continue
        c = by_case.setdefault(info["case"], {"shape": {k: info[k] for k in ("B", "Hq", "Hkv", "T", "D", "dtype")},
                                              "kv_bytes": info["kv_bytes"], "Tq": info.get("Tq")})
        c[info["impl"]] = med
        c.setdefault("bytes_by_impl", {})[info["impl"]] = info["kv_bytes"]
    bandwidth = max(probes) if probes else None
    rows = []
    quant = []
    for name, c in by_case.items():
        if "fp32" in c and "kvloom" in c:  # a quantized row: against the fp32 kernel on the same values
            r = dict(case=name, **c["shape"], quant_us=c["kvloom"] * 1e6, fp32_us=c["fp32"] * 1e6,
                     speedup_vs_fp32=c["fp32"] / c["kvloom"], quant_bytes=c["bytes_by_impl"]["kvloom"],
                     fp32_bytes=c["bytes_by_impl"]["fp32"])
            if c["shape"]["dtype"] in ("int8", "int4"):
                r["target_met"] = bool(r["speedup_vs_fp32"] >= QUANT_TARGET)
            quant.append(r)
            continue
        if "kvloom" not in c or "sdpa" not in c:
            continue
        row = dict(case=name, **c["shape"], kv_bytes=c["kv_bytes"],
                   kvloom_us=c["kvloom"] * 1e6, sdpa_us=c["sdpa"] * 1e6,
                   speedup=c["sdpa"] / c["kvloom"],
                   kvloom_gbps=c["kv_bytes"] / c["kvloom"] / 1e9)
        if "python" in c:  # a chunk row: also against the Python path kvloom used before
            row.update(Tq=c["Tq"], python_us=c["python"] * 1e6, speedup_vs_python=c["python"] / c["kvloom"])
        if bandwidth:
            row["floor_us"] = c["kv_bytes"] / bandwidth * 1e6
            row["bw_fraction"] = c["kv_bytes"] / c["kvloom"] / bandwidth
            # nothing reads the KV faster than the machine's measured read bandwidth: a figure above
            # it means the run was disturbed (or the data sat in cache), not a fast kernel
            row["noisy"] = bool(row["bw_fraction"] > 1.0 or c["kv_bytes"] / c["sdpa"] > 1.05 * bandwidth)
        t = TARGETS.get(name)
        if t:
            ok = True
            if "min_speedup" in t:
                ok &= row["speedup"] >= t["min_speedup"]
            if "min_bw_fraction" in t and "bw_fraction" in row:
                ok &= row["bw_fraction"] >= t["min_bw_fraction"]
            row["target"] = t
            row["target_met"] = bool(ok)
        rows.append(row)
    machine = raw.get("machine_info", {})
    return {
        "read_bandwidth_gbps": bandwidth / 1e9 if bandwidth else None,
        "read_bandwidth_probes_gbps": [p / 1e9 for p in probes],
        "threads": raw.get("kvloom_threads"),
        "machine": {k: machine.get(k) for k in ("node", "processor", "machine", "python_version")},
        "cpu": machine.get("cpu", {}).get("brand_raw"),
        "datetime": raw.get("datetime"),
        "rows": rows,
        "quantized": quant,
    }


class Attention(Benchmark):
    name = "attention"
    help = "decode attention: kvloom vs torch SDPA vs the read-bandwidth floor (needs pytest-benchmark)"

    def add_options(self, p: argparse.ArgumentParser) -> None:
        add_common_options(p, model=False)
        p.add_argument("--quick", action="store_true", help="only the cases the targets are about")
        p.add_argument("--threads", type=int, default=0, help="threads for kvloom and torch (default: all cores)")
        p.add_argument("--rounds", type=int, default=0, help="timed rounds per case (default 30)")

    def run(self, args) -> dict:
        import pytest

        import kvloom

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        raw = out / "attention-raw.json"
        os.environ["KVLOOM_BENCH_QUICK"] = "1" if args.quick else "0"
        if args.threads:
            os.environ["KVLOOM_BENCH_THREADS"] = str(args.threads)
        if args.rounds:
            os.environ["KVLOOM_BENCH_ROUNDS"] = str(args.rounds)
        rc = pytest.main([str(Path(__file__).with_name("attention_cases.py")), "-q", "-p", "no:cacheprovider", "--benchmark-only",
                          f"--benchmark-json={raw}", "--benchmark-columns=median,iqr,rounds", "--benchmark-sort=name"])
        if rc != 0:
            raise SystemExit(f"the attention benchmark failed (pytest exit {rc})")
        data = json.loads(raw.read_text())
        data["kvloom_threads"] = kvloom.get_num_threads()
        return summarize(data)

    def markdown(self, summary: dict) -> str:
        probes = summary.get("read_bandwidth_probes_gbps") or []
        seen = f" (the faster of {len(probes)} probes in the run: {', '.join(f'{p:.1f}' for p in probes)})" \
            if len(probes) > 1 else ""
        head = (f"Read bandwidth (same run, {summary.get('threads')} threads): "
                f"{summary['read_bandwidth_gbps']:.1f} GB/s{seen}\n\n" if summary["read_bandwidth_gbps"] else "")
        noisy = [r["case"] for r in summary["rows"] if r.get("noisy")]
        if noisy:
            head += (f"⚠ noisy: {len(noisy)} case(s) read faster than the bandwidth measured in the same run "
                     "(marked ⚠); the machine was busy or the data was cached: rerun alone before using these "
                     "figures.\n\n")
        rows = []
        chunk = [r for r in summary["rows"] if "python_us" in r]
        for r in summary["rows"]:
            if "python_us" in r:
                continue
            mark = "" if "target_met" not in r else (" ✓" if r["target_met"] else " ✗")
            mark += " ⚠" if r.get("noisy") else ""
            rows.append([f"{r['case']}{mark}", r["B"], f"{r['Hq']}/{r['Hkv']}", r["T"], r["D"], r["dtype"],
                         f"{r['kvloom_us']:.0f}", f"{r['sdpa_us']:.0f}", f"{r['speedup']:.1f}×", f"{r['kvloom_gbps']:.1f}",
                         f"{100 * r.get('bw_fraction', float('nan')):.0f}%", f"{r.get('floor_us', float('nan')):.0f}"])
        out = head + table(["case", "B", "Hq/Hkv", "T", "D", "dtype", "kvloom µs", "SDPA µs", "× SDPA", "kvloom GB/s",
                            "% of read BW", "floor µs"], rows)
        if chunk:
            out += ("\nChunk attention (Tq new tokens over T cached, causal): kvloom's C++ path, the Python path it "
                    "replaced, and SDPA over a dense cache:\n\n" + table(
                        ["case", "Hq/Hkv", "T", "Tq", "kvloom µs", "Python path µs", "× Python path", "SDPA µs", "× SDPA"],
                        [[r["case"], f"{r['Hq']}/{r['Hkv']}", r["T"], r["Tq"], f"{r['kvloom_us']:.0f}",
                          f"{r['python_us']:.0f}", f"{r['speedup_vs_python']:.1f}×", f"{r['sdpa_us']:.0f}",
                          f"{r['speedup']:.2f}×"] for r in chunk]))
        quant = summary.get("quantized") or []
        if quant:
            out += ("\nQuantized blocks (kvloom/quant.h, 32 tokens a block; ✓/✗: int8/int4 at least "
                    f"{QUANT_TARGET}× the fp32 kernel over the same values):\n\n" + table(
                        ["case", "Hq/Hkv", "T", "D", "bytes vs fp32", "quantized µs", "fp32 µs", "× fp32"],
                        [[r["case"] + ("" if "target_met" not in r else (" ✓" if r["target_met"] else " ✗")),
                          f"{r['Hq']}/{r['Hkv']}", r["T"], r["D"], f"{r['quant_bytes'] / r['fp32_bytes']:.3f}",
                          f"{r['quant_us']:.0f}", f"{r['fp32_us']:.0f}", f"{r['speedup_vs_fp32']:.2f}×"] for r in quant]))
        return out

    def draw(self, summary: dict, plt):
        rows = summary["rows"]
        k = [r["kv_bytes"] / (r["kvloom_us"] * 1e-6) / 1e9 for r in rows]
        s = [r["kv_bytes"] / (r["sdpa_us"] * 1e-6) / 1e9 for r in rows]
        fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(rows)), 4.5))
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], k, width=0.4, label="kvloom")
        ax.bar([i + 0.2 for i in x], s, width=0.4, label="torch SDPA")
        if summary["read_bandwidth_gbps"]:
            ax.axhline(summary["read_bandwidth_gbps"], color="k", ls="--", lw=1, label="measured read bandwidth")
        ax.set_xticks(list(x))
        ax.set_xticklabels([r["case"] for r in rows], rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("effective KV read rate (GB/s)")
        ax.set_title("Decode attention, one token: KV bytes / time")
        ax.legend()
        return fig, None


BENCH = Attention()
