"""What one scrape sees of one mapping: its labels, its mode and its counter objects."""

from __future__ import annotations

import dataclasses

from ..kernel.path import KernelCounters
from ..proxy.stats import TcpStats, UdpStats
from ..spec import Mapping, Part, format_endpoint


def mapping_labels(m: Mapping) -> tuple[str, str, str]:
    """(proto, listen, target): the labels of every series of a mapping. Never a client address."""
    return (m.proto, m.listen_label(),
            format_endpoint(m.target_ip, m.target_port, m.target_port_end))


@dataclasses.dataclass
class MappingSnapshot:
    mapping: Mapping
    mode: str
    userland: list[TcpStats | UdpStats]
    """The counter objects of the mapping's listeners (per port; a hybrid's loopback ones too)."""
    kernel: KernelCounters | None
    failed: bool = False
    """The mapping is desired but not running (its last attempt failed; it is retried)."""
    auto: tuple[str, int] | None = None
    """An auto mapping's place now (``userland`` or ``hybrid``) and how often it moved."""


def mapping_snapshot(mapping: Mapping, mode: str, stats: dict[Part, list[TcpStats | UdpStats]],
                     kernel: dict[Part, KernelCounters], failed: bool = False,
                     auto: tuple[str, int] | None = None) -> MappingSnapshot:
    """One mapping's snapshot from the copies a scrape took of every listener's counters
    (``stats``, by one-family part) and of the kernel's (``kernel``, by part): the counters
    of all its families' listeners, and the kernel counters of its first family that has
    them (the parts of one mapping share its DNAT counters)."""
    parts = mapping.per_family()
    return MappingSnapshot(mapping, mode, [s for part in parts for s in stats.get(part, [])],
                           next((kernel[part] for part in parts if part in kernel), None), failed, auto)


class KernelCounterReader:
    """Reads kernel counters for the metrics thread with a libnftables context of its own,
    so a scrape never waits for (or blocks) the controller's worker."""

    def __init__(self, opts) -> None:  # noqa: ANN001 - KernelOptions
        self._opts = opts
        self._nft = None

    def read(self, ids: dict[Part, int]) -> dict[Part, KernelCounters]:
        if not ids:
            return {}
        from ..kernel.executor import Nft
        from ..kernel.path import read_counters

        if self._nft is None:
            self._nft = Nft()
        by_id = read_counters(self._nft, self._opts)
        zero = KernelCounters(0, 0, 0, 0, 0)
        return {m: by_id.get(mapping_id, zero) for m, mapping_id in ids.items()}
