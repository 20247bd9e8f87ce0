"""The one MappingSnapshot builder (portproxy.metrics.snapshot.mapping_snapshot). No root."""

from __future__ import annotations

from portproxy.kernel.path import KernelCounters
from portproxy.metrics.snapshot import MappingSnapshot, mapping_snapshot
from portproxy.proxy.stats import TcpStats, UdpStats
from portproxy.spec import parse_spec


def test_a_dual_family_mapping_gathers_both_families() -> None:
    mapping = parse_spec("9090:172.17.0.2:80")  # no host address: 0.0.0.0 and [::]
    v4, v6 = mapping.per_family()
    s4, s6, other = TcpStats(), TcpStats(), TcpStats()
    counters = KernelCounters(1, 2, 3, 4, 5)
    stats = {v4: [s4], v6: [s6], parse_spec("9091:172.17.0.2:80/udp"): [other]}
    snap = mapping_snapshot(mapping, "hybrid", stats, {v4: counters})
    assert snap == MappingSnapshot(mapping, "hybrid", [s4, s6], counters, False)
    assert mapping_snapshot(mapping, "kernel", stats, {v6: counters}).kernel is counters


def test_a_mapping_with_nothing_yet() -> None:
    mapping = parse_spec("0.0.0.0:53:172.17.0.2:53/udp")
    assert mapping_snapshot(mapping, "userland", {}, {}, failed=True) == \
        MappingSnapshot(mapping, "userland", [], None, True)
    udp = UdpStats()
    assert mapping_snapshot(mapping, "userland", {mapping: [udp]}, {}).userland == [udp]
