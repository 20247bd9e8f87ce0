"""The kernel path: owns portproxy's nft table in this network namespace.

Bookkeeping (which mappings are installed, under which id) changes only after
libnftables accepted the batch, so a refused change leaves both the kernel and
this object exactly as they were. Every method blocks on netlink: call it from a
worker thread, never from the data-plane loop.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterable

from ..spec import Part
from . import builders, conntrack, sysctls
from .builders import MAX_DAEMON_ID, KernelOptions, check_mapping
from .executor import Nft, NftError
from .ids import IdsExhausted, allocate_ids

log = logging.getLogger("portproxy.kernel")

DEEP_CHECK_PORTS = 2000
"""Up to this many published ports a change first checks the table's rules too (a few
ms); beyond, only that its chains exist, and the daemon's periodic check does the rest."""


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
    """portproxy's nft table in this namespace, changed only through :meth:`apply`."""

    def __init__(self, opts: KernelOptions | None = None, nft: Nft | None = None) -> None:
        from ..lock import table_lock_path, take_lock

        self.opts = opts or KernelOptions()
        self._nft = nft or Nft()
        # One owner per table and namespace: the table is rewritten whole, so a second
        # writer (a map --mode kernel beside the daemon) would wipe the first one's DNAT.
        self._lock_path = table_lock_path(self.opts.table)
        self._lock: int | None = take_lock(self._lock_path,
                                           f"the nft table inet {self.opts.table} of this network namespace")
        self.ids: dict[Part, int] = {}
        self.repairs = 0
        """Times a change found the table deleted or altered and rewrote it whole."""

    # --- ids -------------------------------------------------------------------
    def _allocate_ids(self, mappings: list[Part], taken: set[int],
                      preferred: dict[Part, int] | None = None) -> dict[Part, int]:
        """Ids for new mappings: the preferred one (kept across restarts, so live flows'
        conntrack marks stay charged to the same mapping) when free, else the lowest free."""
        try:
            return dict(zip(mappings, allocate_ids([(preferred or {}).get(m) for m in mappings], taken,
                                                   1, MAX_DAEMON_ID)))
        except IdsExhausted:
            raise NftError(f"too many kernel mappings (at most {MAX_DAEMON_ID})") from None

    # --- the one transaction ----------------------------------------------------------
    def apply(self, add: Iterable[Part] = (), remove: Iterable[Part] = (), *, set_sysctls: bool = False,
              replace: bool = False, preferred_ids: dict[Part, int] | None = None) -> None:
        """The one kernel transaction: sysctls, then one nft batch.

        Every caller (``portproxy map --mode kernel``, the daemon's start, add, switch,
        declare and reconcile) goes through here. A refused batch changes nothing, and the
        bookkeeping changes only after libnftables accepted it. ``replace`` rewrites the
        whole table with the result (start, reconcile); otherwise the change is
        incremental, falling back to a full rewrite when the table has gone (someone ran
        ``nft flush ruleset``). What the rules need besides (hairpin mode on bridge ports,
        deleting stale UDP conntrack entries) is the caller's: the daemon's realiser runs
        them as steps it can undo.
        Blocks on netlink: call from the worker thread.
        """
        remove_list = [m for m in dict.fromkeys(remove) if m in self.ids]
        add_list = [m for m in dict.fromkeys(add) if m not in self.ids or replace]
        for m in add_list:
            check_mapping(m, self.opts)
        changed = {*remove_list, *add_list}  # a set: membership below is O(1) per mapping, whatever the batch
        kept = {m: i for m, i in self.ids.items() if m not in changed}
        sysctls.ensure(sysctls.required(add_list, self.opts.route_localnet), set_sysctls)
        new_ids = self._allocate_ids(add_list, set(kept.values()), {**self.ids, **(preferred_ids or {})})
        desired = {**kept, **new_ids}
        old = dict(self.ids)
        problem = None if replace or not old else self.health(deep=self._ports() <= DEEP_CHECK_PORTS)
        if replace or not old or problem:
            if problem:
                self.repairs += 1
                log.warning("%s; reinstalled it with %d mapping(s)", problem, len(desired))
            self._nft.apply(builders.full_table(desired.items(), self.opts))
        else:
            # A target leaves @targets once, with the last of its mappings (deleting an
            # element twice in one batch fails it whole).
            kept_targets = {other.target_ip for other in desired}
            removed = []
            for m in remove_list:
                removed.append((m, old[m], m.target_ip in kept_targets))
                kept_targets.add(m.target_ip)
            commands = builders.remove_mappings(removed, self.opts) if removed else []
            if add_list:
                commands += builders.add_mappings(((m, new_ids[m]) for m in add_list), self.opts)
            if commands:
                self._nft.apply(commands)
        self.ids = desired

    def teardown(self) -> None:
        """Delete the table (and everything in it)."""
        self._nft.apply(builders.delete_table(self.opts))
        self.ids = {}

    def close(self) -> None:
        """Give up the table's lock (the table stays as it is)."""
        from ..lock import release_lock

        if self._lock is not None:
            release_lock(self._lock_path, self._lock)
            self._lock = None

    def _ports(self) -> int:
        return sum(m.port_count for m in self.ids)

    def _chains(self) -> set[str]:
        try:
            return builders.chains_of(self._nft.query(builders.list_chains()), self.opts)
        except NftError:
            return set()

    def table_present(self) -> bool:
        """Whether the table is there (through the cheap list of chains)."""
        return bool(self._chains())

    def health(self, deep: bool = True) -> str | None:
        """Why the table in the kernel is not the one portproxy installed, or None when it is.

        The quick check (``deep=False``) lists the family's chains, which costs the same
        whatever the number of mappings: it finds a deleted table (``nft flush ruleset``)
        or chain. The deep one also counts each chain's rules (a flushed chain); listing a
        chain's rules makes libnftables read every map element, so it costs ~0.3 s per
        chain at 16,000 ports: the daemon runs it less often as the table grows."""
        if not self.ids:
            return None
        chains = self._chains()
        if not chains:
            return f"the nft table {self.opts.table} is missing"
        missing = [name for name in builders.chain_names(self.opts) if name not in chains]
        if missing:
            return f"chain {missing[0]} of the nft table {self.opts.table} is missing"
        if not deep:
            return None
        found: dict[str, int | None] = {}
        for name in builders.chain_names(self.opts):
            try:
                found[name] = builders.count_rules(self._nft.query(builders.list_chain(self.opts, name)))
            except NftError:
                found[name] = None
        problem = builders.skeleton_difference(found, self.opts)
        if problem:
            return problem
        # Elements too (someone ran `nft flush map` or deleted one): their number per map.
        for name, expected in builders.expected_id_elements(self.ids).items():
            try:
                count = builders.count_elements(self._nft.query(builders.list_map(self.opts, name)))
            except NftError:
                count = -1
            if count != expected:
                return f"map {name} of the nft table {self.opts.table} has {max(count, 0)} element(s), not {expected}"
        return None

    # --- side effects the rules need -------------------------------------------------
    @staticmethod
    def forget_udp_flows(mappings: list[Part], translated: bool | None = None) -> int:
        """Delete stale UDP conntrack entries for these mappings' host ports.

        ``translated``: whether the kernel path now DNATs these ports (True), no DNAT may
        remain (False), or no check wanted (None); see conntrack.delete_udp_flows."""
        udp = [m for m in mappings if m.proto == "udp"]
        if not udp:
            return 0
        ports = [(m.host_port, m.host_port_end) for m in udp]
        return conntrack.delete_udp_flows(ports, translated, targets={str(m.target_ip) for m in udp})

    # --- reading ------------------------------------------------------------------------
    def counters(self) -> dict[Part, KernelCounters]:
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
