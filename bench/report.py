"""Turns a pytest-benchmark JSON of the attention benchmark into a summary JSON, a markdown
table and a PNG plot."""
from __future__ import annotations

import json
from pathlib import Path

from .grids import TARGETS


def summarize(raw: dict) -> dict:
    by_case: dict = {}
    bandwidth = None
    for b in raw["benchmarks"]:
        info = b["extra_info"]
        med = b["stats"]["median"]
        if info["impl"] == "probe":
            bandwidth = info["bytes"] / med
            continue
        by_case.setdefault(info["case"], {"shape": {k: info[k] for k in ("B", "Hq", "Hkv", "T", "D", "dtype")},
                                          "kv_bytes": info["kv_bytes"]})[info["impl"]] = med
    rows = []
    for name, c in by_case.items():
        if "kvloom" not in c or "sdpa" not in c:
            continue
        row = dict(case=name, **c["shape"], kv_bytes=c["kv_bytes"],
                   kvloom_us=c["kvloom"] * 1e6, sdpa_us=c["sdpa"] * 1e6,
                   speedup=c["sdpa"] / c["kvloom"],
                   kvloom_gbps=c["kv_bytes"] / c["kvloom"] / 1e9)
        if bandwidth:
            row["floor_us"] = c["kv_bytes"] / bandwidth * 1e6
            row["bw_fraction"] = c["kv_bytes"] / c["kvloom"] / bandwidth
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
        "threads": raw.get("kvloom_threads"),
        "machine": {k: machine.get(k) for k in ("node", "processor", "machine", "python_version")},
        "cpu": machine.get("cpu", {}).get("brand_raw"),
        "datetime": raw.get("datetime"),
        "rows": rows,
    }


def markdown(summary: dict) -> str:
    lines = [f"Read bandwidth (same run, {summary.get('threads')} threads): "
             f"{summary['read_bandwidth_gbps']:.1f} GB/s" if summary["read_bandwidth_gbps"] else "",
             "",
             "| case | B | Hq/Hkv | T | D | dtype | kvloom µs | SDPA µs | × SDPA | kvloom GB/s | % of read BW | floor µs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        mark = "" if "target_met" not in r else (" ✓" if r["target_met"] else " ✗")
        lines.append(
            f"| {r['case']}{mark} | {r['B']} | {r['Hq']}/{r['Hkv']} | {r['T']} | {r['D']} | {r['dtype']} | "
            f"{r['kvloom_us']:.0f} | {r['sdpa_us']:.0f} | {r['speedup']:.1f}× | {r['kvloom_gbps']:.1f} | "
            f"{100 * r.get('bw_fraction', float('nan')):.0f}% | {r.get('floor_us', float('nan')):.0f} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> bool:
    from kvloom._plot import pyplot, save

    plt = pyplot()
    if plt is None:
        return False
    rows = summary["rows"]
    names = [r["case"] for r in rows]
    k = [r["kv_bytes"] / (r["kvloom_us"] * 1e-6) / 1e9 for r in rows]
    s = [r["kv_bytes"] / (r["sdpa_us"] * 1e-6) / 1e9 for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(rows)), 4.5))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], k, width=0.4, label="kvloom")
    ax.bar([i + 0.2 for i in x], s, width=0.4, label="torch SDPA")
    if summary["read_bandwidth_gbps"]:
        ax.axhline(summary["read_bandwidth_gbps"], color="k", ls="--", lw=1, label="measured read bandwidth")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("effective KV read rate (GB/s)")
    ax.set_title("Decode attention, one token: KV bytes / time")
    ax.legend()
    return save(fig, path)


def write(raw_path: Path, out_dir: Path) -> dict:
    from kvloom._results import write

    summary = summarize(json.loads(Path(raw_path).read_text()))
    write(out_dir, "attention", summary, markdown, plot)
    return summary
