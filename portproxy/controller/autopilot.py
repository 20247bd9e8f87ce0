"""The autopilot: samples every auto mapping's load and moves it (``serve`` and ``map`` alike).

Each tick reads the userland counters (plain integers the data plane adds to: free) of
every running auto mapping; the kernel counters (an nft read on the worker thread) only
while some auto mapping is hot, and at most every :data:`KERNEL_INTERVAL` seconds, and a
hot mapping is sampled only with fresh kernel counters, so its load is never read from a
stale half. What a sample means and when to move is :class:`~.auto.AutoPolicy`'s; the
move itself is the caller's (the daemon's live switch under its lock, or ``map``'s).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Awaitable, Callable, Iterable

from ..errors import PortproxyError
from ..proxy.stats import TO_CLIENT, TO_TARGET, TcpStats
from .auto import COOL, AutoPolicy, Sample
from .plan import proxied_reason

if TYPE_CHECKING:
    from ..kernel.builders import KernelOptions
    from ..kernel.path import KernelCounters
    from ..spec import Mapping
    from .realiser import Realiser

log = logging.getLogger("portproxy.controller")

INTERVAL = 0.5
"""Seconds between samples of a light auto mapping."""
KERNEL_INTERVAL = 2.0
"""Seconds between reads of the kernel counters while an auto mapping is hot."""


def sample(mapping: "Mapping", now: float, stats: dict, kernel: dict["Mapping", "KernelCounters"],
           opts: "KernelOptions") -> Sample:
    """The mapping's totals: bytes both ways and connections (UDP: flows) made, on the
    proxy and in the kernel added up (pure)."""
    total_bytes = connections = 0
    for part in mapping.per_family():
        for s in stats.get(part, ()):
            if isinstance(s, TcpStats):
                total_bytes += s.bytes[TO_TARGET] + s.bytes[TO_CLIENT]
                connections += s.accepted
            else:
                total_bytes += s.bytes_to_target + s.bytes_to_client
                connections += s.flows_created
    translated = [p for p in mapping.per_family() if not proxied_reason(p, opts) and p in kernel]
    if translated:  # the families of one mapping share its DNAT counters
        counters = kernel[translated[0]]
        total_bytes += counters.bytes
        connections += counters.connections
    return Sample(now, total_bytes, connections)


async def run(realiser: "Realiser", opts: "KernelOptions",
              mappings: Callable[[], Iterable[tuple["Mapping", AutoPolicy]]],
              move: Callable[["Mapping", str], Awaitable[None]]) -> None:
    """Sample and move until cancelled. ``mappings``: the running auto mappings and their
    policies now; ``move(mapping, place)``: do the move (then call the policy's ``moved``)."""
    loop = asyncio.get_running_loop()
    kernel: dict = {}
    kernel_read = -KERNEL_INTERVAL
    while True:
        await asyncio.sleep(INTERVAL)
        current = list(mappings())
        if not current:
            continue
        now = loop.time()
        fresh = False
        if any(policy.place != COOL for _, policy in current) and now - kernel_read >= KERNEL_INTERVAL:
            if realiser.kernel is not None:
                try:
                    kernel = await realiser.in_worker(realiser.kernel.counters)
                    fresh = True
                except PortproxyError as exc:
                    log.warning("auto: reading the kernel counters failed: %s", exc)
            kernel_read = now
        stats = dict(realiser.proxy.stats)
        for mapping, policy in current:
            if policy.place != COOL and not fresh:
                continue
            place = policy.observe(sample(mapping, now, stats, kernel, opts))
            if place is None:
                continue
            try:
                await move(mapping, place)
            except PortproxyError as exc:  # asked again at the next sample
                log.error("auto: moving %s to %s failed: %s", mapping, place, exc)
