"""Turn a run's raw numbers into the JSON record, the Markdown tables and the chart.

Everything here is pure: it reads the ``results`` dictionary the runner filled in
and writes files. The chart needs matplotlib (the optional ``bench`` extra).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
from pathlib import Path
from typing import Any, Callable

from .paths import AUTO, DIRECT, DOCKER_PROXY, KERNEL, SPLICE, SPLICE_CUBIC
from .procfs import default_congestion_control
from .workloads import CPU_PER_CONNECTION, CPU_PER_DATAGRAM, CPU_PER_GB, WORKLOADS

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
    """workload → path → metric → median/min/max over the rounds that succeeded."""
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for workload in WORKLOADS:
        runs = results["workloads"].get(workload.key, {}).get("runs", {})
        for path, samples in runs.items():
            for metric in workload.metrics:
                values = [v for s in samples if isinstance(v := s.get(metric.key), (int, float)) and math.isfinite(v)]
                if values:
                    out.setdefault(workload.key, {}).setdefault(path, {})[metric.key] = summarize(values)
    return out


def errors_of(record: dict, path: str) -> list[str]:
    """Why the runs of one path failed (a list, one entry per failed round)."""
    found = record.get("errors", {}).get(path) or []
    return [found] if isinstance(found, str) else list(found)


def _why(reasons: list[str]) -> str:
    unique = list(dict.fromkeys(reasons))
    return "; ".join(unique[:2]) + (f" (and {len(unique) - 2} more)" if len(unique) > 2 else "")


Figure = tuple[float | None, str | None]
"""A measured value, or None and why there is none."""


def figure(results: Results, summary: dict, workload_key: str, path: str, metric_key: str | None = None) -> Figure:
    """The median of one metric of one path, or why it was not measured."""
    workload = next(w for w in WORKLOADS if w.key == workload_key)
    key = metric_key or workload.metrics[0].key
    entry = summary.get(workload_key, {}).get(path, {}).get(key)
    if entry:
        return entry["median"], None
    record = results.get("workloads", {}).get(workload_key)
    label = results.get("paths", {}).get(path, path)
    if record is None:
        return None, f"{workload_key} not run"
    if path not in results.get("paths", {}):
        return None, f"{path} not run"
    failed = errors_of(record, path)
    if failed:
        return None, f"{label}: failed: {_why(failed)}"
    return None, f"{label}: no {key} in its runs"


def memory_figure(results: Results, part: str, path: str, key: str) -> Figure:
    """One memory figure of one path, or why it was not measured."""
    entry = results.get("memory", {}).get(part, {}).get("results", {}).get(path)
    if entry is None:
        return None, f"{path}: not measured"
    if "error" in entry:
        return None, f"{path}: failed: {entry['error']}"
    value = entry.get(key)
    return (value, None) if isinstance(value, (int, float)) and math.isfinite(value) else (None, f"{path}: no {key}")


def headline(summary: dict, workload_key: str, path: str) -> float | None:
    workload = next(w for w in WORKLOADS if w.key == workload_key)
    entry = summary.get(workload_key, {}).get(path, {}).get(workload.metrics[0].key)
    return entry["median"] if entry else None


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def ratio_of(a: Figure, b: Figure) -> Figure:
    """a / b, or why not (either missing; a base of zero is not a base)."""
    if a[0] is None or b[0] is None:
        return None, "; ".join(dict.fromkeys(why for value, why in (a, b) if value is None and why))
    if not b[0]:
        return None, "the base of the ratio is zero"
    return a[0] / b[0], None


def targets(results: Results, summary: dict) -> list[dict[str, Any]]:
    """The targets, each with what this run measured, or "not measured" and why.

    A target is met or missed only on a figure that was measured; a failed or missing
    measurement is never met (``met`` is None, ``shown`` says why)."""
    def f(workload: str, path: str, metric: str | None = None) -> Figure:
        return figure(results, summary, workload, path, metric)

    def vs_dp(workload: str, metric: str | None = None) -> Figure:
        return ratio_of(f(workload, SPLICE, metric), f(workload, DOCKER_PROXY, metric))

    mappings = results.get("memory", {}).get("mappings", {})
    idle = results.get("memory", {}).get("idle", {})
    slow = results.get("memory", {}).get("slow_readers", {})
    rows: list[tuple[str, Figure, str, Callable[[float], bool], str]] = [
        ("userland single-stream throughput vs docker-proxy", vs_dp("tcp-1"), "≥ 1.5×", lambda v: v >= 1.5,
         "{:.2f}×"),
        ("userland single-stream throughput vs kernel path", ratio_of(f("tcp-1", SPLICE), f("tcp-1", KERNEL)),
         "≥ 0.9×", lambda v: v >= 0.9, "{:.2f}×"),
        ("auto mode, 4 streams, vs kernel path", ratio_of(f("tcp-4", AUTO), f("tcp-4", KERNEL)), "≥ 0.9×",
         lambda v: v >= 0.9, "{:.2f}×"),
        ("userland connection rate vs docker-proxy", vs_dp("conn-rate"), "≥ 1.5×", lambda v: v >= 1.5, "{:.2f}×"),
        ("userland relay CPU per connection (wrk, Connection: close) vs docker-proxy",
         vs_dp("conn-rate", CPU_PER_CONNECTION.key), "≤ 0.5×", lambda v: v <= 0.5, "{:.2f}×"),
        ("userland relay CPU per UDP datagram delivered (1 Gbit/s offered) vs docker-proxy",
         vs_dp("udp-1g", CPU_PER_DATAGRAM.key), "≤ 0.5×", lambda v: v <= 0.5, "{:.2f}×"),
        ("userland relay CPU per GB (1 stream) vs docker-proxy", vs_dp("tcp-1", CPU_PER_GB.key), "≤ 0.5×",
         lambda v: v <= 0.5, "{:.2f}×"),
        ("userland UDP request/response p50 vs docker-proxy", vs_dp("udp-rr"), "≤ 1.0×", lambda v: v <= 1.0,
         "{:.2f}×"),
        (f"RSS of one process with {mappings.get('count', 1000)} mappings",
         memory_figure(results, "mappings", SPLICE, "rss_mib"), "≤ 64 MB", lambda v: v * 1.048576 <= 64,
         "{:.1f} MiB"),
        (f"memory per idle connection at {idle.get('count', 8000)} connections",
         memory_figure(results, "idle", SPLICE, "kib_per_connection"), "≤ 6 KB", lambda v: v * 1.024 <= 6,
         "{:.2f} KiB"),
        ("UDP loss at 1 Gbit/s offered, 1400 B datagrams", f("udp-1g", SPLICE, "loss_percent"), "≤ 5 %",
         lambda v: v <= 5, "{:.2f} %"),
        (f"kernel memory pinned by {slow.get('count', 200)} never-reading clients vs direct routing",
         ratio_of(memory_figure(results, "slow_readers", SPLICE, "total_mib"),
                  memory_figure(results, "slow_readers", DIRECT, "total_mib")), "≤ 2×", lambda v: v <= 2,
         "{:.2f}×"),
    ]
    if SPLICE_CUBIC in results.get("paths", {}):  # run only where the system default is not cubic
        rows[2:2] = [
            ("the same with --target-cc cubic, vs docker-proxy",
             ratio_of(f("tcp-1", SPLICE_CUBIC), f("tcp-1", DOCKER_PROXY)), "≥ 1.5×", lambda v: v >= 1.5, "{:.2f}×"),
            ("the same with --target-cc cubic, vs kernel path",
             ratio_of(f("tcp-1", SPLICE_CUBIC), f("tcp-1", KERNEL)), "≥ 0.9×", lambda v: v >= 0.9, "{:.2f}×"),
        ]
    out = []
    for name, (value, why), goal, check, fmt in rows:
        measured = value is not None and math.isfinite(value)
        out.append({"target": name, "goal": goal, "value": value if measured else None,
                    "shown": fmt.format(value) if measured else "not measured",
                    "why": None if measured else (why or "no figure"),
                    "met": bool(check(value)) if measured else None})
    return out


# --- Markdown -----------------------------------------------------------------------------------
CPU_NOTE = ("\nRelay CPU: user + system time of the relaying processes over the run, their children "
            "included (/proc/PID/stat), per unit of work; none for direct routing and the kernel path, "
            "which have no process. Machine CPU: the whole machine's busy time (/proc/stat user + nice + "
            "system + irq + softirq, every CPU) per unit: load generator, servers and relay together, and "
            "the only figure for the kernel path, whose NAT runs in softirq context; its excess over "
            "direct routing is what the path costs; it also counts whatever else the machine runs, so "
            "it means something only on a quiet machine. Both count in 10 ms clock ticks.")


def _md(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


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
        if t["met"] is None:
            lines.append(f"| {t['target']} | {t['goal']} | not measured: {_md(t['why'])} | **not measured** |")
            continue
        lines.append(f"| {t['target']} | {t['goal']} | {t['shown']} | {'met' if t['met'] else '**MISSED**'} |")
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
            failed = errors_of(record, path)
            runs = record.get("runs", {}).get(path, [])
            if not runs and not failed:
                continue
            if not runs:  # nothing measured: the reason, never a number
                cells = [f"failed: {_md(_why(failed))}"] + ["–"] * (len(workload.metrics) + 1)
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
                continue
            entry = summary.get(workload.key, {}).get(path, {})
            cells = [_cell(entry.get(mt.key)) for mt in workload.metrics]
            value = headline(summary, workload.key, path)
            ratios = [f"{r:.2f}" if (r := _ratio(value, b)) is not None else "–" for b in (base_dp, base_k)]
            note = (f" — {len(failed)} of {len(failed) + len(runs)} rounds failed: {_md(_why(failed))}"
                    if failed else "")
            lines.append(f"| {label}{note} | " + " | ".join(cells + ratios) + " |")
        lines.append(f"\n{better.capitalize()} {head.label} is better.")
        if any("cpu" in mt.key for mt in workload.metrics):
            lines.append(CPU_NOTE)
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
            held = f"{r['relay_sockets_opened']:,.0f}" if "relay_sockets_opened" in r else "–"
            return [fewer, f"{r['kib_per_connection']:.2f}", f"{r['rss_before_mib']:.1f} → {r['rss_after_mib']:.1f}",
                    held]

        lines += _memory_table(f"Memory per idle connection ({count} connections open at once)",
                               ["KiB per connection", "RSS before → after (MiB)", "sockets the relay opened"],
                               memory["idle"]["results"], labels, idle_row)
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
            cells = [f"failed: {_md(r['error'])}"] + ["–"] * (len(columns) - 1)
            lines.append(f"| {labels.get(path, path)} | " + " | ".join(cells) + " |")
            continue
        suffix, *cells = render(r)
        lines.append(f"| {labels[path]}{suffix} | " + " | ".join(cells) + " |")
    return lines


# --- chart --------------------------------------------------------------------------------------
Spread = tuple[float, float, float]
"""median, min, max over the rounds"""


Panel = tuple[str, str, dict[str, Spread], bool]
"""title, axis unit, path → spread, log scale"""


def chart_panels(results: Results) -> list[Panel]:
    """What the chart draws: per workload its headline and the relay's CPU per unit, per
    memory figure its value (one measurement: no range); failed measurements are absent."""
    summary = summaries(results)
    labels: dict[str, str] = results["paths"]
    panels: list[Panel] = []
    for workload in WORKLOADS:
        for metric in workload.metrics:
            if metric is not workload.metrics[0] and not metric.key.startswith("cpu_"):
                continue  # the headline, and what each unit of it costs the relay (machine CPU: tables)
            spreads = {p: (e["median"], e["min"], e["max"]) for p in labels
                       if (e := summary.get(workload.key, {}).get(p, {}).get(metric.key))}
            if spreads:
                arrow = "↑" if metric.higher_is_better else "↓"
                title = workload.label if metric is workload.metrics[0] else f"{workload.key}: {metric.label} per unit"
                panels.append((title, f"{metric.unit} {arrow}", spreads, False))
    memory = results.get("memory", {})
    for part, key, unit in (("mappings", "rss_mib", "MiB ↓"), ("idle", "kib_per_connection", "KiB ↓"),
                            ("slow_readers", "total_mib", "MiB ↓")):
        rows = memory.get(part, {}).get("results", {})
        spreads = {p: (r[key], r[key], r[key]) for p, r in rows.items() if key in r and "error" not in r}
        if spreads:
            title = {"mappings": f"RSS with {memory[part]['count']} mappings",
                     "idle": f"memory per idle connection ({memory[part]['count']})",
                     "slow_readers": f"kernel memory, {memory[part]['count']} slow readers"}[part]
            panels.append((title, unit + " (log scale)", spreads, True))  # MiB next to GB
    return panels


def chart(results: Results, path: Path) -> bool:
    """One bar panel per workload's headline metric, per CPU-per-unit figure and per memory
    figure; each bar a median with its min–max range. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        return False
    panels = chart_panels(results)
    labels: dict[str, str] = results["paths"]
    if not panels:
        return False
    columns = 2
    rows_n = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows_n, columns, figsize=(14, 3.2 * rows_n), squeeze=False)
    colours = {key: f"C{i % 10}" for i, key in enumerate(labels)}
    for ax, (title, unit, spreads, log) in zip(axes.flat, panels):
        keys = list(spreads)
        medians = [spreads[k][0] for k in keys]
        # Error bars: each median's min–max over the rounds.
        xerr: list[list[float]] | None = [[spreads[k][0] - spreads[k][1] for k in keys],
                                          [spreads[k][2] - spreads[k][0] for k in keys]]
        if not any(xerr[0] + xerr[1]):
            xerr = None  # one measurement (memory, or a single round): no range to draw
        ax.barh([labels[k] for k in keys], medians, color=[colours[k] for k in keys],
                xerr=xerr, error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "black"})
        for y, k in enumerate(keys):  # the median's figure, past its whisker
            ax.annotate(_num(spreads[k][0]), xy=(spreads[k][2], y), xytext=(4, 0), textcoords="offset points",
                        va="center", fontsize=7)
        if log:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # decades only: the minor labels overlap
        ax.margins(x=0.15)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(unit, fontsize=9)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"portproxy bench — {results['time']} — {results['machine']['cpus']} CPUs — "
                 "bars: medians; whiskers: min–max over the rounds", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / (3.2 * rows_n)))  # room for the suptitle
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
