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
from .checks import per_unit, relay_cpu_per_unit
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
MACHINE_CPU_PER_GB = Metric("machine_cpu_s_per_gb", "machine CPU", "CPU-s/GB", False)
CPU_PER_CONNECTION = Metric("cpu_us_per_connection", "relay CPU", "CPU-µs/conn", False)
MACHINE_CPU_PER_CONNECTION = Metric("machine_cpu_us_per_connection", "machine CPU", "CPU-µs/conn", False)
CPU_PER_DATAGRAM = Metric("cpu_us_per_datagram", "relay CPU", "CPU-µs/datagram", False)
MACHINE_CPU_PER_DATAGRAM = Metric("machine_cpu_us_per_datagram", "machine CPU", "CPU-µs/datagram", False)
P50 = Metric("p50_us", "p50 round trip", "µs", False)
P99 = Metric("p99_us", "p99 round trip", "µs", False)


@dataclasses.dataclass(frozen=True)
class CpuReading:
    """The relay processes' CPU and the whole machine's busy CPU, in seconds, at one moment."""

    relay: float
    machine: float

    @classmethod
    def now(cls, path: Published) -> CpuReading:
        return cls(procfs.cpu_seconds(path.relay_pids), procfs.machine_busy_seconds())


def cost_per_unit(path: Published, before: CpuReading, units: float, what: str, scale: float,
                  relay_key: str, machine_key: str) -> dict[str, float]:
    """CPU per unit of work since ``before``: the relay processes' utime+stime (their
    children included; none for direct routing and the kernel path, which have no
    process) and the whole machine's busy time (everything: load generator, servers,
    relay, softirq; the only figure the kernel path has, compared with direct routing's)."""
    after = CpuReading.now(path)
    metrics = {machine_key: per_unit(after.machine - before.machine, units, what) * scale}
    if path.relay_pids:
        metrics[relay_key] = relay_cpu_per_unit(after.relay - before.relay, units, what, scale)
    return metrics


def _tcp_stream(parallel: int, reverse: bool = False) -> Callable[[DemoTopology, Published, Settings], dict[str, float]]:
    def run(topo: DemoTopology, path: Published, settings: Settings) -> dict[str, float]:
        before = CpuReading.now(path)
        result = tools.iperf(topo.client, path.host, path.port(IPERF, "tcp"), settings.seconds, parallel,
                             reverse=reverse)
        gbit, received = tools.tcp_stream(result)
        return {GBITS.key: gbit, **cost_per_unit(path, before, received / 1e9, "GB received", 1.0,
                                                 CPU_PER_GB.key, MACHINE_CPU_PER_GB.key)}

    return run


def _latency(service: Service, tcp: bool) -> Callable[[DemoTopology, Published, Settings], dict[str, float]]:
    def run(topo: DemoTopology, path: Published, settings: Settings) -> dict[str, float]:
        port = path.port(service, "tcp" if tcp else "udp")
        return tools.sockperf_ping_pong(topo.client, path.host, port, settings.seconds, tcp)

    return run


def _connection_rate(topo: DemoTopology, path: Published, settings: Settings) -> dict[str, float]:
    before = CpuReading.now(path)
    metrics = tools.wrk_short_connections(topo.client, path.host, path.port(HTTP, "tcp"), settings.seconds,
                                          settings.connections)
    return {**metrics, **cost_per_unit(path, before, metrics["connections"], "connections completed", 1e6,
                                       CPU_PER_CONNECTION.key, MACHINE_CPU_PER_CONNECTION.key)}


UDP_RATE = "1G"
UDP_LENGTH = 1400


def _udp_stream(topo: DemoTopology, path: Published, settings: Settings) -> dict[str, float]:
    before = CpuReading.now(path)
    result = tools.iperf(topo.client, path.host, path.port(IPERF, "udp"), settings.seconds,
                         udp_rate=UDP_RATE, length=UDP_LENGTH)
    metrics = tools.udp_stream(result)
    return {**metrics, **cost_per_unit(path, before, metrics["delivered_datagrams"], "datagrams delivered", 1e6,
                                       CPU_PER_DATAGRAM.key, MACHINE_CPU_PER_DATAGRAM.key)}


WORKLOADS = (
    Workload("tcp-1", "TCP throughput, 1 stream (iperf3)", IPERF, "tcp", (GBITS, CPU_PER_GB, MACHINE_CPU_PER_GB),
             _tcp_stream(1)),
    Workload("tcp-1-down", "TCP throughput, 1 stream, container to client (iperf3 -R)", IPERF, "tcp",
             (GBITS, CPU_PER_GB, MACHINE_CPU_PER_GB), _tcp_stream(1, reverse=True)),
    Workload("tcp-4", "TCP throughput, 4 streams (iperf3 -P 4)", IPERF, "tcp",
             (GBITS, CPU_PER_GB, MACHINE_CPU_PER_GB), _tcp_stream(4)),
    Workload("tcp-rr", "TCP request/response, 64 B (sockperf ping-pong)", SOCKPERF_TCP, "tcp", (P50, P99),
             _latency(SOCKPERF_TCP, tcp=True)),
    Workload("conn-rate", "Connection rate, Connection: close (wrk → nginx)", HTTP, "tcp",
             (Metric("connections_per_s", "connections", "conn/s", True),
              Metric("errors", "errors", "count", False), CPU_PER_CONNECTION, MACHINE_CPU_PER_CONNECTION),
             _connection_rate),
    Workload("udp-1g", f"UDP at 1 Gbit/s offered, {UDP_LENGTH} B datagrams (iperf3 -u)", IPERF, "udp",
             (Metric("delivered_datagrams_per_s", "delivered", "datagrams/s", True),
              Metric("loss_percent", "loss", "%", False), CPU_PER_DATAGRAM, MACHINE_CPU_PER_DATAGRAM), _udp_stream),
    Workload("udp-rr", "UDP request/response, 64 B (sockperf ping-pong)", SOCKPERF_UDP, "udp", (P50, P99),
             _latency(SOCKPERF_UDP, tcp=False)),
)
