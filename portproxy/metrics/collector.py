"""A prometheus-client collector: builds the metric families from snapshots at scrape time.

Names follow Prometheus conventions (``portproxy_`` prefix, ``_total`` counters, base
units). Every series carries ``proto``, ``listen`` and ``target``; traffic series also
``path`` (userland or kernel), so a mapping reports the same metrics on either path.
A mapping that is removed is simply absent from the next snapshot: its series go.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import __version__
from ..schema import MODES
from ..proxy.stats import CONNECT_BUCKETS, TO_CLIENT, TO_TARGET, TcpStats, UdpStats
from .snapshot import MappingSnapshot, mapping_labels

log = logging.getLogger("portproxy.metrics")

BASE = ["proto", "listen", "target"]


class MappingCollector(Collector):
    def __init__(self, snapshot: Callable[[], Iterable[MappingSnapshot]],
                 daemon_counters: Callable[[], dict[str, int]] | None = None) -> None:
        self._snapshot = snapshot
        self._daemon_counters = daemon_counters

    def collect(self) -> Iterator[Metric]:
        try:
            snapshots = list(self._snapshot())
        except Exception as exc:  # noqa: BLE001 - a failed read must not break the scrape
            log.warning("metrics snapshot failed: %s", exc)
            snapshots = []
        build = GaugeMetricFamily("portproxy_build_info", "portproxy build information", labels=["version"])
        build.add_metric([__version__], 1)
        yield build
        if self._daemon_counters is not None:
            counters = self._daemon_counters()
            reconciles = CounterMetricFamily("portproxy_kernel_reconciles",
                                             "Times the nft table was found deleted or altered and reinstalled")
            reconciles.add_metric([], counters.get("kernel_reconciles", 0))
            yield reconciles
            failing = GaugeMetricFamily("portproxy_state_save_failing",
                                        "1 while the daemon serves a state the disk refused to save (retried)")
            failing.add_metric([], counters.get("state_save_failing", 0))
            yield failing
            save_failures = CounterMetricFamily("portproxy_state_save_failures",
                                                "Saves of the daemon's state the disk refused")
            save_failures.add_metric([], counters.get("state_save_failures", 0))
            yield save_failures

        mode = GaugeMetricFamily("portproxy_mapping_mode", "1 for the path a mapping runs on", labels=BASE + ["mode"])
        failed = GaugeMetricFamily("portproxy_mapping_failed",
                                   "1 while a desired mapping cannot run (it is retried with back-off)", labels=BASE)
        accepted = CounterMetricFamily("portproxy_connections", "Connections (TCP) or flows (kernel UDP) accepted",
                                       labels=BASE + ["path"])
        active = GaugeMetricFamily("portproxy_connections_active", "TCP connections being relayed by the proxy",
                                   labels=BASE)
        traffic = CounterMetricFamily("portproxy_bytes", "Bytes relayed (kernel: IP packets incl. headers)",
                                      labels=BASE + ["path", "direction"])
        packets = CounterMetricFamily("portproxy_kernel_packets", "Packets translated by the kernel path",
                                      labels=BASE + ["direction"])
        failures = CounterMetricFamily("portproxy_connect_failures", "Failed connects to the target",
                                       labels=BASE + ["reason"])
        accept_errors = CounterMetricFamily("portproxy_accept_errors", "accept() failures (EMFILE, ENFILE, ...)",
                                            labels=BASE + ["reason"])
        latency = HistogramMetricFamily("portproxy_connect_duration_seconds", "Time to connect to the target",
                                        labels=BASE)
        flows_active = GaugeMetricFamily("portproxy_udp_flows_active", "UDP flows in the proxy's table", labels=BASE)
        flows = CounterMetricFamily("portproxy_udp_flows", "UDP flows by how they ended or began",
                                    labels=BASE + ["event"])
        datagrams = CounterMetricFamily("portproxy_udp_datagrams", "UDP datagrams relayed by the proxy",
                                        labels=BASE + ["direction"])
        auto_kernel = GaugeMetricFamily("portproxy_auto_on_kernel", "Auto mode: 1 while the mapping is on the kernel "
                                        "path (hybrid), 0 while on the userland path", labels=BASE)
        auto_moves = CounterMetricFamily("portproxy_auto_moves", "Auto mode: moves between the paths", labels=BASE)
        fallbacks = CounterMetricFamily("portproxy_source_fallbacks", "Transparent mode: connections or flows made "
                                        "from the host's address because the client's could not be used",
                                        labels=BASE + ["reason"])

        for snap in snapshots:
            labels = list(mapping_labels(snap.mapping))
            for name in MODES:
                mode.add_metric(labels + [name], 1 if snap.mode == name else 0)
            failed.add_metric(labels, 1 if snap.failed else 0)
            if snap.auto is not None:
                auto_kernel.add_metric(labels, 1 if snap.auto[0] != "userland" else 0)
                auto_moves.add_metric(labels, snap.auto[1])
            tcp = [s for s in snap.userland if isinstance(s, TcpStats)]
            udp = [s for s in snap.userland if isinstance(s, UdpStats)]
            if snap.mode != "kernel" or tcp or udp:
                self._userland(labels, tcp, udp, accepted, active, traffic, failures, accept_errors, latency,
                               flows_active, flows, datagrams)
            if snap.kernel is not None:
                k = snap.kernel
                accepted.add_metric(labels + ["kernel"], k.connections)
                traffic.add_metric(labels + ["kernel", "to_target"], k.bytes_to_target)
                traffic.add_metric(labels + ["kernel", "to_client"], k.bytes_to_client)
                packets.add_metric(labels + ["to_target"], k.packets_to_target)
                packets.add_metric(labels + ["to_client"], k.packets_to_client)
            _add_fallbacks(fallbacks, labels, snap.userland)
        yield from (mode, failed, auto_kernel, auto_moves, accepted, active, traffic, packets, failures, accept_errors, latency, flows_active,
                    flows, datagrams, fallbacks)

    @staticmethod
    def _userland(labels, tcp, udp, accepted, active, traffic, failures, accept_errors, latency, flows_active, flows,
                  datagrams) -> None:
        to_target = sum(s.bytes[TO_TARGET] for s in tcp) + sum(s.bytes_to_target for s in udp)
        to_client = sum(s.bytes[TO_CLIENT] for s in tcp) + sum(s.bytes_to_client for s in udp)
        traffic.add_metric(labels + ["userland", "to_target"], to_target)
        traffic.add_metric(labels + ["userland", "to_client"], to_client)
        if tcp or not udp:
            accepted.add_metric(labels + ["userland"], sum(s.accepted for s in tcp))
            active.add_metric(labels, sum(s.active for s in tcp))
            reasons: dict[str, int] = {}
            errors: dict[str, int] = {}
            for s in tcp:
                for reason, n in list(s.connect_failures.items()):
                    reasons[reason] = reasons.get(reason, 0) + n
                for reason, n in list(s.accept_errors.items()):
                    errors[reason] = errors.get(reason, 0) + n
            for reason, n in sorted(reasons.items()):
                failures.add_metric(labels + [reason], n)
            for reason, n in sorted(errors.items()):
                accept_errors.add_metric(labels + [reason], n)
            counts = [sum(s.connect_buckets[i] for s in tcp) for i in range(len(CONNECT_BUCKETS) + 1)]
            cumulative, running = [], 0
            for bound, n in zip([*map(str, CONNECT_BUCKETS), "+Inf"], counts):
                running += n
                cumulative.append((bound, running))
            latency.add_metric(labels, cumulative, sum(s.connect_seconds_sum for s in tcp))
        if udp:
            flows_active.add_metric(labels, sum(s.flows_active for s in udp))
            for event in ("created", "expired", "evicted"):
                flows.add_metric(labels + [event], sum(getattr(s, f"flows_{event}") for s in udp))
            datagrams.add_metric(labels + ["to_target"], sum(s.datagrams_to_target for s in udp))
            datagrams.add_metric(labels + ["to_client"], sum(s.datagrams_to_client for s in udp))


def _add_fallbacks(family: CounterMetricFamily, labels: list[str], stats: Iterable[TcpStats | UdpStats]) -> None:
    """One series per reason that happened (none for a mapping without transparent mode)."""
    reasons: dict[str, int] = {}
    for s in stats:
        for reason, n in list(s.source_fallbacks.items()):
            reasons[reason] = reasons.get(reason, 0) + n
    for reason, n in sorted(reasons.items()):
        family.add_metric(labels + [reason], n)
