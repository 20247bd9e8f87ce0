"""What the single-purpose benchmark scripts here share, taken from ``portproxy.bench``
(the topology, its sysctls, the servers, iperf3), plus their result files.

``portproxy bench`` is the main benchmark; these scripts measure one question each
(the kernel path at 10,000 mappings, the cost of metrics).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from portproxy.bench.report import machine, summarize
from portproxy.bench.servers import IPERF, container_servers
from portproxy.bench.tools import iperf, tcp_stream
from portproxy.bench.topology import bench_topology as topology

__all__ = ["IPERF_PORT", "container_servers", "gbits", "iperf", "print_ratio_table", "summarize", "topology",
           "write_result"]

RESULTS = Path(__file__).resolve().parent / "results"
IPERF_PORT = IPERF.port


def gbits(result: dict) -> float:
    return tcp_stream(result)[0]


def print_ratio_table(title: str, summary: dict[str, dict], baseline: str) -> None:
    """A Markdown table of Gbit/s medians, min–max and the ratio to ``baseline``."""
    base = summary[baseline]["median"]
    print(f"\n| {title} | Gbit/s median | min–max | × {baseline} |")
    print("|---|---:|---:|---:|")
    for label, s in summary.items():
        print(f"| {label} | {s['median']:.2f} | {s['min']:.2f}–{s['max']:.2f} | {s['median'] / base:.2f} |")


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), **data}, indent=2))
    return path
