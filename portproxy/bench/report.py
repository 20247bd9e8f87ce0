"""Turn a run's raw numbers into the JSON record, the Markdown tables and the chart.

Everything here is pure: it reads the ``results`` dictionary the runner filled in
and writes files. The chart needs matplotlib (the optional ``bench`` extra).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any, Callable

from .paths import DIRECT, DOCKER_PROXY, KERNEL, SPLICE, SPLICE_CUBIC
from .procfs import default_congestion_control
from .workloads import WORKLOADS

Results = dict[str, Any]


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_gib = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem_gib, 1),
            "python": platform.python_version(), "os": _os_name(),
            "tcp_cc": default_congestion_control()}


def _os_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return platform.system()


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summaries(results: Results) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """workload → path → metric → median/min/max over the rounds."""
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for workload in WORKLOADS:
        runs = results["workloads"].get(workload.key, {}).get("runs", {})
        for path, samples in runs.items():
            for metric in workload.metrics:
                values = [s[metric.key] for s in samples if metric.key in s]
                if values:
                    out.setdefault(workload.key, {}).setdefault(path, {})[metric.key] = summarize(values)
    return out


def headline(summary: dict, workload_key: str, path: str) -> float | None:
    workload = next(w for w in WORKLOADS if w.key == workload_key)
    entry = summary.get(workload_key, {}).get(path, {}).get(workload.metrics[0].key)
    return entry["median"] if entry else None


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def targets(results: Results, summary: dict) -> list[dict[str, Any]]:
    """The issue's targets, each with what this run measured (None: not measured)."""
    def h(workload: str, path: str) -> float | None:
        return headline(summary, workload, path)

    loss = summary.get("udp-1g", {}).get(SPLICE, {}).get("loss_percent", {}).get("median")
    mappings = results.get("memory", {}).get("mappings", {})
    idle = results.get("memory", {}).get("idle", {})
    rss = mappings.get("results", {}).get(SPLICE, {}).get("rss_mib")
    per_conn = idle.get("results", {}).get(SPLICE, {}).get("kib_per_connection")
    slow = results.get("memory", {}).get("slow_readers", {})
    pinned = {key: slow.get("results", {}).get(key, {}).get("total_mib") for key in (SPLICE, DIRECT)}
    rows = [
        ("userland single-stream throughput vs docker-proxy", _ratio(h("tcp-1", SPLICE), h("tcp-1", DOCKER_PROXY)),
         "≥ 1.5×", lambda v: v >= 1.5, "{:.2f}×"),
        ("userland single-stream throughput vs kernel path", _ratio(h("tcp-1", SPLICE), h("tcp-1", KERNEL)),
         "≥ 0.9×", lambda v: v >= 0.9, "{:.2f}×"),
        ("userland connection rate vs docker-proxy", _ratio(h("conn-rate", SPLICE), h("conn-rate", DOCKER_PROXY)),
         "≥ 1.0×", lambda v: v >= 1.0, "{:.2f}×"),
        (f"RSS of one process with {mappings.get('count', 1000)} mappings", rss, "≤ 64 MB",
         lambda v: v * 1.048576 <= 64, "{:.1f} MiB"),
        (f"memory per idle connection at {idle.get('count', 8000)} connections", per_conn, "≤ 6 KB",
         lambda v: v * 1.024 <= 6, "{:.2f} KiB"),
        ("UDP loss at 1 Gbit/s offered, 1400 B datagrams", loss, "≤ 5 %", lambda v: v <= 5, "{:.2f} %"),
        (f"kernel memory pinned by {slow.get('count', 200)} never-reading clients vs direct routing",
         _ratio(pinned[SPLICE], pinned[DIRECT]), "≤ 2×", lambda v: v <= 2, "{:.2f}×"),
    ]
    cubic = h("tcp-1", SPLICE_CUBIC)
    if cubic is not None:  # measured only where the system default is not cubic
        rows[2:2] = [
            ("the same with --target-cc cubic, vs docker-proxy", _ratio(cubic, h("tcp-1", DOCKER_PROXY)),
             "≥ 1.5×", lambda v: v >= 1.5, "{:.2f}×"),
            ("the same with --target-cc cubic, vs kernel path", _ratio(cubic, h("tcp-1", KERNEL)),
             "≥ 0.9×", lambda v: v >= 0.9, "{:.2f}×"),
        ]
    return [{"target": name, "goal": goal, "value": value,
             "shown": fmt.format(value) if value is not None else "not measured",
             "met": bool(check(value)) if value is not None else None}
            for name, value, goal, check, fmt in rows]


# --- Markdown -----------------------------------------------------------------------------------
def _cell(entry: dict[str, float] | None) -> str:
    if not entry:
        return "–"
    if entry["n"] == 1:
        return _num(entry["median"])
    return f"{_num(entry['median'])} ({_num(entry['min'])}–{_num(entry['max'])})"


def _num(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def markdown(results: Results, chart_name: str | None) -> str:
    summary = summaries(results)
    labels: dict[str, str] = results["paths"]
    m = results["machine"]
    s = results["settings"]
    lines = [
        f"# portproxy bench — {results['time']}",
        "",
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['memory_gib']} GiB, {m['os']}, Linux {m['kernel']}, "
        f"Python {m['python']}, TCP congestion control {m.get('tcp_cc', 'unknown')} (every namespace's default).",
        f"Run: {s['rounds']} round(s) × {s['seconds']} s per workload and path, paths alternated round by round; "
        f"conntrack reset before every run{' (quick smoke run: not for comparison)' if s['quick'] else ''}.",
        "Cells: median (min–max) over the rounds. Ratios compare medians of the headline metric.",
        "",
        "## Targets",
        "",
        "| target | goal | measured | |",
        "|---|---|---:|---|",
    ]
    for t in targets(results, summary):
        verdict = "met" if t["met"] else ("**MISSED**" if t["met"] is False else "–")
        lines.append(f"| {t['target']} | {t['goal']} | {t['shown']} | {verdict} |")
    if chart_name:
        lines += ["", f"![chart]({chart_name})"]
    for workload in WORKLOADS:
        record = results["workloads"].get(workload.key)
        if not record:
            continue
        head = workload.metrics[0]
        better = "higher" if head.higher_is_better else "lower"
        lines += ["", f"## {workload.label}", "",
                  "| path | " + " | ".join(f"{mt.label} ({mt.unit})" for mt in workload.metrics)
                  + " | × docker-proxy | × kernel |",
                  "|---|" + "---:|" * (len(workload.metrics) + 2)]
        base_dp = headline(summary, workload.key, DOCKER_PROXY)
        base_k = headline(summary, workload.key, KERNEL)
        for path, label in labels.items():
            error = record.get("errors", {}).get(path)
            if path not in record.get("runs", {}) and not error:
                continue
            entry = summary.get(workload.key, {}).get(path, {})
            cells = [_cell(entry.get(mt.key)) for mt in workload.metrics]
            value = headline(summary, workload.key, path)
            ratios = [f"{r:.2f}" if (r := _ratio(value, b)) is not None else "–" for b in (base_dp, base_k)]
            note = f" — failed: {error}" if error else ""
            lines.append(f"| {label}{note} | " + " | ".join(cells + ratios) + " |")
        lines.append(f"\n{better.capitalize()} {head.label} is better.")
    memory = results.get("memory", {})
    if memory.get("mappings"):
        count = memory["mappings"]["count"]

        def mapping_row(r: dict) -> list[str]:
            scaled = f" (measured on {r['sampled']:.0f}, scaled)" if r["sampled"] < count else ""
            return ["", f"{r['rss_mib']:.1f}{scaled}", f"{r['processes']:.0f}"]

        lines += _memory_table(f"Memory: {count} published TCP ports", ["RSS (MiB)", "processes"],
                               memory["mappings"]["results"], labels, mapping_row)
    if memory.get("idle"):
        count = memory["idle"]["count"]

        def idle_row(r: dict) -> list[str]:
            fewer = f" (at {r['connections']:.0f} connections)" if r["connections"] != count else ""
            return [fewer, f"{r['kib_per_connection']:.2f}", f"{r['rss_before_mib']:.1f} → {r['rss_after_mib']:.1f}"]

        lines += _memory_table(f"Memory per idle connection ({count} connections open at once)",
                               ["KiB per connection", "RSS before → after (MiB)"], memory["idle"]["results"],
                               labels, idle_row)
        lines.append("\nThe kernel path keeps no process state per connection (a conntrack entry, in the kernel).")
    if memory.get("slow_readers"):
        count = memory["slow_readers"]["count"]
        direct = memory["slow_readers"]["results"].get(DIRECT, {}).get("total_mib")

        def slow_row(r: dict) -> list[str]:
            ratio = f"{r['total_mib'] / direct:.2f}×" if direct else "–"
            return ["", f"{r['total_mib']:.1f}", ratio, f"{r['kib_per_client']:.0f}", f"{r['client_mib']:.1f}",
                    f"{r['host_mib']:.1f}", f"{r['container_mib']:.1f}", f"{r['pipes_mib']:.1f}"]

        lines += _memory_table(f"Kernel memory pinned by {count} clients that never read (server writes flat out)",
                               ["total MiB", "× direct", "KiB per client", "client ns", "host ns", "container ns",
                                "pipes"], memory["slow_readers"]["results"], labels, slow_row)
        lines.append("\nSocket memory is `ss -tm` skmem r + w + f (what counts against tcp_mem) summed over every "
                     "TCP socket of each namespace; pipes are the bytes waiting in the relay's pipes (FIONREAD).")
    return "\n".join(lines) + "\n"


def _memory_table(title: str, columns: list[str], rows: dict[str, dict], labels: dict[str, str],
                  render: Callable[[dict], list[str]]) -> list[str]:
    """A memory table; ``render`` gives a row's label suffix and its cells."""
    lines = ["", f"## {title}", "", "| path | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for path, r in rows.items():
        if "error" in r:
            lines.append(f"| {labels[path]} — failed: {r['error']} | " + " | ".join("–" for _ in columns) + " |")
            continue
        suffix, *cells = render(r)
        lines.append(f"| {labels[path]}{suffix} | " + " | ".join(cells) + " |")
    return lines


# --- chart --------------------------------------------------------------------------------------
def chart(results: Results, path: Path) -> bool:
    """One bar panel per workload's headline metric and per memory figure. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    summary = summaries(results)
    labels: dict[str, str] = results["paths"]
    panels: list[tuple[str, str, dict[str, float], bool]] = []  # title, unit, values, log scale
    for workload in WORKLOADS:
        head = workload.metrics[0]
        values = {p: v for p in labels if (v := headline(summary, workload.key, p)) is not None}
        if values:
            arrow = "↑" if head.higher_is_better else "↓"
            panels.append((workload.label, f"{head.unit} {arrow}", values, False))
    memory = results.get("memory", {})
    for part, key, unit in (("mappings", "rss_mib", "MiB ↓"), ("idle", "kib_per_connection", "KiB ↓"),
                            ("slow_readers", "total_mib", "MiB ↓")):
        rows = memory.get(part, {}).get("results", {})
        values = {p: r[key] for p, r in rows.items() if key in r}
        if values:
            title = {"mappings": f"RSS with {memory[part]['count']} mappings",
                     "idle": f"memory per idle connection ({memory[part]['count']})",
                     "slow_readers": f"kernel memory, {memory[part]['count']} slow readers"}[part]
            panels.append((title, unit + " (log scale)", values, True))  # MiB next to GB
    if not panels:
        return False
    columns = 2
    rows_n = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows_n, columns, figsize=(14, 3.2 * rows_n), squeeze=False)
    colours = {key: f"C{i}" for i, key in enumerate(labels)}
    for ax, (title, unit, values, log) in zip(axes.flat, panels):
        keys = list(values)
        bars = ax.barh([labels[k] for k in keys], [values[k] for k in keys], color=[colours[k] for k in keys])
        ax.bar_label(bars, labels=[_num(values[k]) for k in keys], fontsize=7, padding=2)
        if log:
            ax.set_xscale("log")
        ax.margins(x=0.15)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(unit, fontsize=9)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"portproxy bench — {results['time']} — {results['machine']['cpus']} CPUs", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write(results: Results, out: Path, with_chart: bool = True) -> dict[str, Path]:
    """bench.json, bench.md and (with matplotlib) bench.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": out / "bench.json"}
    record = dict(results)
    summary = summaries(results)
    record["summary"] = summary
    record["targets"] = targets(results, summary)
    written["json"].write_text(json.dumps(record, indent=2, ensure_ascii=False))
    chart_name = None
    if with_chart and chart(results, out / "bench.png"):
        written["png"] = out / "bench.png"
        chart_name = "bench.png"
    written["md"] = out / "bench.md"
    written["md"].write_text(markdown(results, chart_name))
    return written
