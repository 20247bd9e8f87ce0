"""``portproxy bench``: build the network, start every path, run every workload round by
round, measure memory, and write the report.

Paths are alternated within each round (and the order rotates between rounds) so
that drift on a shared two-core machine hits every path alike. A path or workload
that fails is recorded with its reason and the run goes on.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Callable, TextIO

from ..runtime import raise_fd_limit
from . import report
from .checks import Unmeasured
from .arguments import Options, options_from
from .memory import IdleSink, idle_connections_for, rss_per_idle_connection, rss_with_mappings
from .paths import PathDef, PathError, Running, available_paths
from .slow_readers import Firehose, pinned_by_slow_readers
from .servers import SERVICES, container_servers
from .tools import ToolError
from .topology import bench_topology, reset_conntrack
from .workloads import WORKLOADS, Published, Settings, Workload

if TYPE_CHECKING:
    from ..lab.topology import DemoTopology

PORT_BASE = 20000


class Progress:
    """One line per step on stderr, numbered against the planned total."""

    def __init__(self, total: int, out: TextIO = sys.stderr) -> None:
        self.total = total
        self.done = 0
        self.out = out
        self.started = time.monotonic()

    def step(self, text: str) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.started
        print(f"[{self.done}/{self.total} {elapsed:5.0f}s] {text}", file=self.out, flush=True)

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)


def main(args: argparse.Namespace) -> int:
    opts = options_from(args)
    raise_fd_limit()  # the idle-connection figure holds two sockets per connection here
    workloads = [w for w in WORKLOADS if opts.workloads is None or w.key in opts.workloads]
    paths = available_paths(opts.paths)
    unknown = set(opts.paths or []) - {p.key for p in paths}
    if unknown:
        print(f"portproxy: bench: unknown or unavailable path(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    unknown = set(opts.workloads or []) - {w.key for w in WORKLOADS}
    if unknown:
        print(f"portproxy: bench: unknown workload(s): {', '.join(sorted(unknown))} "
              f"(known: {', '.join(w.key for w in WORKLOADS)})", file=sys.stderr)
        return 2
    results: report.Results = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": report.machine(),
        "settings": {"seconds": opts.seconds, "rounds": opts.rounds, "wrk_connections": opts.connections,
                     "quick": opts.quick},
        "paths": {p.key: p.label for p in paths},
        "workloads": {w.key: {"label": w.label, "runs": {}, "errors": {}} for w in workloads},
        "memory": {},
    }
    runs = opts.rounds * sum(1 for w in workloads for p in paths if _carries(p, w))
    memory_steps = 2 * sum(1 for p in paths if p.start is not None and p.memory) if opts.memory else 0
    if opts.memory and opts.slow_readers:
        memory_steps += sum(1 for p in paths if p.memory)
    progress = Progress(runs + memory_steps)
    with bench_topology() as topo:
        progress.say(f"topology up: client {topo.client.name} → host {topo.host.name} → container {topo.container.name}")
        with container_servers(topo):
            published, running, failed = _start_paths(topo, paths)
            try:
                for key, error in failed.items():
                    for w in workloads:
                        results["workloads"][w.key]["errors"][key] = [error]
                live = [p for p in paths if p.key in published]
                for rnd in range(opts.rounds):
                    order = live[rnd % len(live):] + live[:rnd % len(live)] if live else []
                    for workload in workloads:
                        for path in order:
                            if _carries(path, workload):
                                _one_run(topo, workload, published[path.key], opts, rnd, results, progress)
            finally:
                for r in running:
                    r.stop()
        if opts.memory:
            _memory(topo, paths, opts, results, progress)
    written = report.write(results, opts.out, with_chart=opts.chart)
    progress.say("wrote " + ", ".join(str(p) for p in written.values()))
    if opts.chart and "png" not in written:
        progress.say("no chart: matplotlib is not installed (pip install 'portproxy[bench]')")
    return 0


def _carries(path: PathDef, workload: Workload) -> bool:
    return workload.proto in path.protocols and (path.services is None or workload.service.name in path.services)


def _start_paths(topo: DemoTopology, paths: list[PathDef]) -> tuple[dict[str, Published], list[Running], dict[str, str]]:
    """Start every path once, each on its own block of host ports, all services published."""
    published: dict[str, Published] = {}
    running: list[Running] = []
    failed: dict[str, str] = {}
    for index, path in enumerate(paths):
        if path.start is None:  # direct routing: dial the container itself
            ports = {(s.name, proto): s.port for s in SERVICES for proto in s.protocols}
            published[path.key] = Published(path.key, path.label, topo.container_ip, ports, [])
            continue
        ports = {}
        forwards = []
        for offset, service in enumerate(SERVICES):
            host_port = PORT_BASE + 100 * index + offset  # one port per service: iperf3's UDP test
            for proto in service.protocols:              # runs on its TCP control port's number
                if proto in path.protocols and (path.services is None or service.name in path.services):
                    ports[(service.name, proto)] = host_port
                    forwards.append((host_port, service.port, proto))
        try:
            started = path.start(topo, forwards)
        except (PathError, OSError) as exc:
            failed[path.key] = str(exc)
            print(f"path {path.key} not started: {exc}", file=sys.stderr)
            continue
        running.append(started)
        published[path.key] = Published(path.key, path.label, topo.host_ip, ports, started.relay_pids)
    return published, running, failed


def _one_run(topo: DemoTopology, workload: Workload, path: Published, opts: Options, rnd: int,
             results: report.Results, progress: Progress) -> None:
    record = results["workloads"][workload.key]
    reset_conntrack(topo)
    head = workload.metrics[0]
    try:
        metrics = workload.run(topo, path, Settings(opts.seconds, opts.connections))
    except (ToolError, PathError, Unmeasured, OSError, KeyError) as exc:
        record["errors"].setdefault(path.key, []).append(str(exc))
        progress.step(f"round {rnd + 1} {workload.key:<9} {path.key:<17} failed: {exc}")
        return
    record["runs"].setdefault(path.key, []).append(metrics)
    extra = "  ".join(f"{k}={v:.3g}" for k, v in metrics.items() if k != head.key)
    progress.step(f"round {rnd + 1} {workload.key:<9} {path.key:<17} {metrics.get(head.key, float('nan')):10.4g} "
                  f"{head.unit}  {extra}")


def _memory(topo: DemoTopology, paths: list[PathDef], opts: Options, results: report.Results,
            progress: Progress) -> None:
    mappings: dict[str, dict] = {}
    idle: dict[str, dict] = {}
    results["memory"] = {"mappings": {"count": opts.mappings, "results": mappings},
                         "idle": {"count": opts.idle_connections, "results": idle}}
    sink = IdleSink(topo)
    try:
        for path in paths:
            if path.start is None or not path.memory:
                continue
            reset_conntrack(topo)  # 8,000 connections per path would fill the table otherwise
            _measure(progress, mappings, path, f"{opts.mappings} mappings",
                     lambda: rss_with_mappings(topo, path, opts.mappings), lambda r: f"{r['rss_mib']:.1f} MiB")
            if path.in_kernel:  # nothing per connection in a process
                progress.step(f"memory {path.key:<17} idle connections: in the kernel, skipped")
                continue
            count = idle_connections_for(path, opts.idle_connections)
            _measure(progress, idle, path, f"{count} idle connections",
                     lambda: rss_per_idle_connection(topo, sink, path, count),
                     lambda r: f"{r['kib_per_connection']:.2f} KiB each")
    finally:
        sink.close()
    if opts.slow_readers:
        _slow_readers(topo, paths, opts, results, progress)


def _slow_readers(topo: DemoTopology, paths: list[PathDef], opts: Options, results: report.Results,
                  progress: Progress) -> None:
    pinned: dict[str, dict] = {}
    results["memory"]["slow_readers"] = {"count": opts.slow_readers, "results": pinned}
    firehose = Firehose(topo)
    try:
        for path in paths:
            if not path.memory:
                continue
            reset_conntrack(topo)
            _measure(progress, pinned, path, f"{opts.slow_readers} slow readers",
                     lambda: pinned_by_slow_readers(topo, firehose, path, opts.slow_readers),
                     lambda r: f"{r['total_mib']:.1f} MiB pinned")
    finally:
        firehose.close()


def _measure(progress: Progress, into: dict[str, dict], path: PathDef, what: str,
             measure: Callable[[], dict[str, float]], shown: Callable[[dict[str, float]], str]) -> None:
    """One memory figure of one path: its result or why it failed, and a progress line."""
    try:
        into[path.key] = measure()
        progress.step(f"memory {path.key:<17} {what}: {shown(into[path.key])}")
    except (PathError, Unmeasured, OSError) as exc:
        into[path.key] = {"error": str(exc)}
        progress.step(f"memory {path.key:<17} {what}: failed: {exc}")
