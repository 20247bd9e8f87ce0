"""The kernel path: owns portproxy's nft table in this network namespace.

Bookkeeping (which mappings are installed, under which id) changes only after
libnftables accepted the batch, so a refused change leaves both the kernel and
this object exactly as they were. Every method blocks on netlink: call it from a
worker thread, never from the data-plane loop.
"""

from __future__ import annotations

import dataclasses
import logging

from ..spec import Mapping
from . import builders, conntrack, hairpin
from .builders import KernelOptions, MAX_MAPPING_ID, check_mapping
from .executor import Nft, NftError

log = logging.getLogger("portproxy.kernel")


@dataclasses.dataclass(frozen=True)
class KernelCounters:
    connections: int
    """Flows DNAT'd (the dispatch lookup sees one packet per flow)."""
    packets_to_target: int
    bytes_to_target: int
    packets_to_client: int
    bytes_to_client: int
    """Every packet of those flows by direction, IP headers included."""

    @property
    def packets(self) -> int:
        return self.packets_to_target + self.packets_to_client

    @property
    def bytes(self) -> int:
        return self.bytes_to_target + self.bytes_to_client


class KernelPath:
    def __init__(self, opts: KernelOptions | None = None, nft: Nft | None = None) -> None:
        self.opts = opts or KernelOptions()
        self._nft = nft or Nft()
        self.ids: dict[Mapping, int] = {}

    # --- ids -------------------------------------------------------------------
    def _allocate_ids(self, mappings: list[Mapping], taken: set[int]) -> dict[Mapping, int]:
        ids: dict[Mapping, int] = {}
        next_id = 1
        for m in mappings:
            while next_id in taken:
                next_id += 1
            if next_id > MAX_MAPPING_ID:
                raise NftError(f"too many kernel mappings (at most {MAX_MAPPING_ID})")
            ids[m] = next_id
            taken.add(next_id)
        return ids

    # --- changes ------------------------------------------------------------------
    def install(self, mappings: list[Mapping]) -> None:
        """Replace the whole table with exactly ``mappings`` in one atomic batch."""
        for m in mappings:
            check_mapping(m)
        ids = self._allocate_ids(list(dict.fromkeys(mappings)), set())
        self._nft.apply(builders.full_table(ids.items(), self.opts))
        self.ids = ids

    def add(self, mapping: Mapping) -> None:
        if mapping in self.ids:
            return
        if not self.ids and not self.table_present():
            self.install([mapping])
            return
        check_mapping(mapping)
        ids = self._allocate_ids([mapping], set(self.ids.values()))
        self._nft.apply(builders.add_mapping(mapping, ids[mapping], self.opts))
        self.ids.update(ids)

    def remove(self, mapping: Mapping) -> None:
        mapping_id = self.ids.get(mapping)
        if mapping_id is None:
            return
        shared = any(other.target_ip == mapping.target_ip for other in self.ids if other != mapping)
        self._nft.apply(builders.remove_mapping(mapping, mapping_id, self.opts, target_still_used=shared))
        del self.ids[mapping]

    def teardown(self) -> None:
        """Delete the table (and everything in it)."""
        self._nft.apply(builders.delete_table(self.opts))
        self.ids = {}

    def table_present(self) -> bool:
        return self._nft.table_exists(builders.FAMILY, self.opts.table)

    # --- side effects the rules need -------------------------------------------------
    @staticmethod
    def forget_udp_flows(mappings: list[Mapping], translated: bool | None = None) -> int:
        """Delete stale UDP conntrack entries for these mappings' host ports.

        ``translated``: whether the kernel path now DNATs these ports (True), no DNAT may
        remain (False), or no check wanted (None); see conntrack.delete_udp_flows."""
        udp = [m for m in mappings if m.proto == "udp"]
        if not udp:
            return 0
        ports = [(m.host_port, m.host_port_end) for m in udp]
        return conntrack.delete_udp_flows(ports, translated, targets={str(m.target_ip) for m in udp})

    @staticmethod
    def enable_hairpin(mappings: list[Mapping]) -> list[str]:
        return hairpin.enable_for(mappings)

    # --- reading ------------------------------------------------------------------------
    def counters(self) -> dict[Mapping, KernelCounters]:
        """Current counters of every installed mapping (a few libnftables reads)."""
        if not self.ids:
            return {}
        by_id = read_counters(self._nft, self.opts)
        zero = KernelCounters(0, 0, 0, 0, 0)
        return {m: by_id.get(mapping_id, zero) for m, mapping_id in self.ids.items()}


def read_counters(nft: Nft, opts: KernelOptions) -> dict[int, KernelCounters]:
    """Counters of every mapping in the table, by mapping id (whoever installed them)."""
    outputs = [nft.query(command) for command in builders.list_counters(opts)]
    connections, traffic = builders.parse_counters(outputs)
    to_target, to_client = traffic["to_target"], traffic["to_client"]
    marks = {*connections, *to_target, *to_client}
    return {
        mark >> builders.CT_MARK_SHIFT: KernelCounters(
            connections.get(mark, 0), *to_target.get(mark, (0, 0)), *to_client.get(mark, (0, 0)))
        for mark in marks
    }
