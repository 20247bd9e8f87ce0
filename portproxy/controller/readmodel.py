"""What the controller shows: the listing (``ls``, GET /v1/mappings), health, the metrics'
snapshots and counters, the one-line summary. Reads only; changes nothing but the last
problem seen with the nft table."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from ..kernel.executor import NftError
from ..proxy.stats import TO_CLIENT, TO_TARGET, TcpStats, UdpStats
from ..schema import MODES
from .plan import KERNEL, components, part_components, proxied_reason, served_by

if TYPE_CHECKING:
    from ..metrics.snapshot import MappingSnapshot
    from .core import Controller

log = logging.getLogger("portproxy.controller")


def summary(c: "Controller") -> str:
    """One line for STATUS= and the ready line: how many mappings on which path."""
    modes = [e.mode for e in c.entries.values()]
    failed = sum(1 for e in c.entries.values() if e.status == "failed")
    parts = ", ".join(f"{modes.count(m)} {m}" for m in MODES if modes.count(m))
    return (f"{len(modes)} mapping(s){': ' + parts if parts else ''}{f', {failed} failed' if failed else ''}; "
            f"{c.connection_count()} connection(s)")


def daemon_status(c: "Controller") -> dict[str, Any]:
    """The daemon's own condition: whether its state is saved (None: it is)."""
    return {"state_save_error": c.save_error, "state_save_failures": c.save_failures,
            "routing_problem": c.upkeep.routing_problem}


def health(c: "Controller") -> dict[str, Any]:
    """What a probe needs without the listing's cost (no kernel counters are read)."""
    entries = list(c.entries.values())
    return {"mappings": len(entries), "failed": sum(e.status == "failed" for e in entries),
            "kernel_problem": c.upkeep.kernel_problem, "routing_problem": c.upkeep.routing_problem,
            "state_save_error": c.save_error}


def daemon_counters(c: "Controller") -> dict[str, int]:
    """Counters and gauges of the daemon itself, for the metrics thread."""
    kernel = c.realiser.kernel
    repairs = kernel.repairs if kernel is not None else 0
    return {"kernel_reconciles": c.upkeep.reconciles + repairs, "state_save_failing": int(c.save_error is not None),
            "state_save_failures": c.save_failures}


def metrics_snapshot(c: "Controller") -> list["MappingSnapshot"]:
    """Called on the metrics thread: copies first (the loop thread may be changing things)."""
    from ..metrics.snapshot import KernelCounterReader, mapping_snapshot

    entries = [(m, e.mode, e.status, (e.path, e.auto.moves) if e.auto is not None else None)
               for m, e in list(c.entries.items())]
    stats = dict(c.realiser.proxy.stats)
    kernel_counters = {}
    kernel = c.realiser.kernel
    if kernel is not None:
        if c.metrics_reader is None:
            c.metrics_reader = KernelCounterReader(c.options.kernel)
        kernel_counters = c.metrics_reader.read(dict(kernel.ids))
    return [mapping_snapshot(m, mode, stats, kernel_counters, failed=status == "failed", auto=auto)
            for m, mode, status, auto in entries]


async def describe(c: "Controller") -> list[dict[str, Any]]:
    """Every mapping as it is, kernel side read from the kernel (a deleted table shows)."""
    counters = {}
    kernel = c.realiser.kernel
    proxy = c.realiser.proxy
    if kernel is not None and kernel.ids:
        try:
            c.upkeep.kernel_problem = await c.realiser.in_worker(kernel.health, False)
            if c.upkeep.kernel_problem is None:
                counters = await c.realiser.in_worker(kernel.counters)
        except NftError as exc:
            log.warning("reading kernel counters failed: %s", exc)
    # The API calls the entry's origin (who asked for the mapping) "source".
    result = []
    for mapping, entry in sorted(c.entries.items(), key=lambda item: item[0].sort_key()):
        item: dict[str, Any] = {"spec": str(mapping), "mode": entry.mode, "source": entry.origin,
                                "status": entry.status}
        if entry.error:
            item["error"] = entry.error
        if entry.owner:
            item["owner"] = entry.owner
        if entry.settings.overrides:
            item["options"] = dict(entry.settings.overrides)
        parts = mapping.per_family()
        userland = [s for p in parts for s in proxy.stats.get(p, [])]
        tcp = [s for s in userland if isinstance(s, TcpStats)]
        udp = [s for s in userland if isinstance(s, UdpStats)]
        item["userland"] = {
            "listening": [p.listen_label() for p in parts if proxy.serving(p)],
            "connections": sum(s.active for s in tcp),
            "accepted": sum(s.accepted for s in tcp),
            "bytes_to_target": sum(s.bytes[TO_TARGET] for s in tcp) + sum(s.bytes_to_target for s in udp),
            "bytes_to_client": sum(s.bytes[TO_CLIENT] for s in tcp) + sum(s.bytes_to_client for s in udp),
            "udp_flows": sum(s.flows_active for s in udp),
        }
        if entry.auto is not None:
            load = entry.auto.load
            item["auto"] = {"on": entry.path, "moves": entry.auto.moves,
                            "bytes_per_second": round(load.bytes_per_second) if load else None,
                            "connections_per_second": round(load.connections_per_second, 1) if load else None}
        item["families"] = {f"ipv{p.listen_ip().version}": served_by(part_components(p, components(entry.path),
                                                                                     c.options.kernel))
                            for p in parts}
        translated = [p for p in parts if not proxied_reason(p, c.options.kernel)]
        if KERNEL in components(entry.path) and entry.status == "running" and translated:
            counter = counters.get(translated[0])
            if counter is not None:
                item["kernel"] = {**dataclasses.asdict(counter), "packets": counter.packets, "bytes": counter.bytes}
            else:
                item["kernel"] = None
                item["kernel_problem"] = c.upkeep.kernel_problem or "not in the nft table"
        result.append(item)
    return result
