"""One measurement each: what it runs, which service it needs, what it reports.

A workload takes a *published* path (the address and host ports the client dials,
and the processes that relay) and returns its metrics for one run. Conntrack is
reset before every run by the caller.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from ..lab.topology import DemoTopology
from . import procfs, tools
from .servers import HTTP, IPERF, SOCKPERF_TCP, SOCKPERF_UDP, Service


@dataclasses.dataclass
class Published:
    """A running path as the client sees it."""

    key: str
    label: str
    host: str
    ports: dict[tuple[str, str], int]  # (service name, protocol) → port to dial
    relay_pids: list[int]

    def port(self, service: Service, proto: str) -> int:
        return self.ports[(service.name, proto)]


@dataclasses.dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool


@dataclasses.dataclass(frozen=True)
class Settings:
    seconds: float
    connections: int  # wrk's concurrent connections


@dataclasses.dataclass(frozen=True)
class Workload:
    key: str
    label: str
    service: Service
    proto: str
    metrics: tuple[Metric, ...]  # the first one is the headline (ratios, chart)
    run: Callable[[DemoTopology, Published, Settings], dict[str, float]]


GBITS = Metric("gbit_per_s", "throughput", "Gbit/s", True)
CPU_PER_GB = Metric("cpu_s_per_gb", "relay CPU", "CPU-s/GB", False)
P50 = Metric("p50_us", "p50 round trip", "µs", False)
P99 = Metric("p99_us", "p99 round trip", "µs", False)


def _tcp_stream(parallel: int, reverse: bool = False) -> Callable[[DemoTopology, Published, Settings], dict[str, float]]:
    def run(topo: DemoTopology, path: Published, settings: Settings) -> dict[str, float]:
        before = procfs.cpu_seconds(path.relay_pids)
        result = tools.iperf(topo.client, path.host, path.port(IPERF, "tcp"), settings.seconds, parallel,
                             reverse=reverse)
        gbit, received = tools.tcp_stream(result)
        metrics = {GBITS.key: gbit}
        if path.relay_pids and received:
            metrics[CPU_PER_GB.key] = (procfs.cpu_seconds(path.relay_pids) - before) / (received / 1e9)
        return metrics

    return run


def _latency(service: Service, tcp: bool) -> Callable[[DemoTopology, Published, Settings], dict[str, float]]:
    def run(topo: DemoTopology, path: Published, settings: Settings) -> dict[str, float]:
        port = path.port(service, "tcp" if tcp else "udp")
        return tools.sockperf_ping_pong(topo.client, path.host, port, settings.seconds, tcp)

    return run


def _connection_rate(topo: DemoTopology, path: Published, settings: Settings) -> dict[str, float]:
    return tools.wrk_short_connections(topo.client, path.host, path.port(HTTP, "tcp"), settings.seconds,
                                       settings.connections)


UDP_RATE = "1G"
UDP_LENGTH = 1400


def _udp_stream(topo: DemoTopology, path: Published, settings: Settings) -> dict[str, float]:
    result = tools.iperf(topo.client, path.host, path.port(IPERF, "udp"), settings.seconds,
                         udp_rate=UDP_RATE, length=UDP_LENGTH)
    return tools.udp_stream(result)


WORKLOADS = (
    Workload("tcp-1", "TCP throughput, 1 stream (iperf3)", IPERF, "tcp", (GBITS, CPU_PER_GB), _tcp_stream(1)),
    Workload("tcp-1-down", "TCP throughput, 1 stream, container to client (iperf3 -R)", IPERF, "tcp",
             (GBITS, CPU_PER_GB), _tcp_stream(1, reverse=True)),
    Workload("tcp-4", "TCP throughput, 4 streams (iperf3 -P 4)", IPERF, "tcp", (GBITS, CPU_PER_GB), _tcp_stream(4)),
    Workload("tcp-rr", "TCP request/response, 64 B (sockperf ping-pong)", SOCKPERF_TCP, "tcp", (P50, P99),
             _latency(SOCKPERF_TCP, tcp=True)),
    Workload("conn-rate", "Connection rate, Connection: close (wrk → nginx)", HTTP, "tcp",
             (Metric("connections_per_s", "connections", "conn/s", True),
              Metric("errors", "errors", "count", False)), _connection_rate),
    Workload("udp-1g", f"UDP at 1 Gbit/s offered, {UDP_LENGTH} B datagrams (iperf3 -u)", IPERF, "udp",
             (Metric("delivered_datagrams_per_s", "delivered", "datagrams/s", True),
              Metric("loss_percent", "loss", "%", False)), _udp_stream),
    Workload("udp-rr", "UDP request/response, 64 B (sockperf ping-pong)", SOCKPERF_UDP, "udp", (P50, P99),
             _latency(SOCKPERF_UDP, tcp=False)),
)
