"""``portproxy map``: run the given mappings in the foreground until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import TYPE_CHECKING, TextIO

from . import offloop
from .errors import PortproxyError
from .proxy import ProxyOptions
from .proxy.server import ProxyError, listener_name
from .spec import Mapping

if TYPE_CHECKING:
    from .controller.auto import AutoThresholds
    from .controller.config import Mode
    from .controller.realiser import Realiser
    from .kernel.builders import KernelOptions
    from .kernel.transparent import SharedRouting
    from .kernel.transparent_rules import TransparentOptions
    from .metrics import MappingSnapshot

log = logging.getLogger("portproxy")


def print_ready(mapping: Mapping, out: TextIO, suffix: str = "") -> None:
    """One ``ready`` line per host port: scripts wait for these before sending traffic."""
    for host_port, target_port in mapping.port_pairs():
        print(f"ready {listener_name(mapping, host_port, target_port)}{suffix}", file=out, flush=True)


def stop_signal() -> "asyncio.Future[int]":
    """A future that SIGINT or SIGTERM completes with the signal number.

    Installed before the ``ready`` lines are printed, so a supervisor that signals
    as soon as it reads them always gets a graceful stop.
    """
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[int] = loop.create_future()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, lambda s=signum: stop.done() or stop.set_result(s))
    return stop


def _start_metrics(addr: str | None, snapshot) -> object | None:  # noqa: ANN001
    """Start the exposition thread, or say in one line why it cannot listen."""
    if addr is None:
        return None
    from .metrics import MappingCollector, start_metrics_server

    try:
        server, _thread = start_metrics_server(addr, MappingCollector(snapshot))
    except OSError as exc:
        raise ProxyError(f"cannot serve metrics on {addr}: {exc.strerror}") from None
    return server


async def start_transparent(opts: "TransparentOptions") -> "SharedRouting":
    """Take a share of transparent mode's routing, installing it if this process is the
    first user (off the loop); TransparentError says why not."""
    from .kernel.transparent import SharedRouting

    routing = SharedRouting(opts)
    await offloop.run(routing.acquire)
    return routing


async def stop_transparent(routing: "SharedRouting | None") -> None:
    """Give the share back (the last user removes the routing); a failure is one line on stderr."""
    if routing is None:
        return
    try:
        await offloop.run(routing.release)
    except PortproxyError as exc:
        print(f"portproxy: {exc}", file=sys.stderr)


async def run_userland(mappings: list[Mapping], options: ProxyOptions, out: TextIO = sys.stdout,
                       metrics_addr: str | None = None, transparent: "TransparentOptions | None" = None) -> int:
    """Start every mapping (all or nothing), print ready lines, serve until a stop signal.

    ``transparent``: the routing of transparent mode (``--source client``), installed
    before the first listener and removed after the last connection is gone."""
    from .kernel.builders import KernelOptions

    stop = stop_signal()
    realiser, steps = _realiser(mappings, "userland", options, KernelOptions(), transparent=transparent)
    proxy = realiser.proxy

    def snapshot() -> list["MappingSnapshot"]:
        # Imported here, when the first scrape comes: without --metrics-addr the process
        # never loads prometheus-client (a few MiB of resident memory).
        from .metrics.snapshot import mapping_snapshot

        stats = dict(proxy.stats)  # one atomic copy: the loop thread may add to it
        return [mapping_snapshot(m, "userland", stats, {}) for m in mappings]

    try:
        await realiser.run(steps)
        metrics = _start_metrics(metrics_addr, snapshot)
    except PortproxyError as exc:
        print(f"portproxy: {exc}", file=sys.stderr)
        await realiser.stop(keep_kernel_rules=True, drain_timeout=0)
        return 1
    for mapping in mappings:
        for part in mapping.per_family():
            print_ready(part, out)
    signum = await stop
    log.info("%s: draining %d connection(s) for up to %gs", signal.Signals(signum).name,
             proxy.connection_count(), options.drain_timeout)
    await realiser.stop(keep_kernel_rules=True)
    if metrics is not None:
        metrics.shutdown()  # type: ignore[attr-defined]
    return 0


async def run_auto(mappings: list[Mapping], options: ProxyOptions, kernel: "KernelOptions", set_sysctls: bool,
                   thresholds: "AutoThresholds", out: TextIO = sys.stdout, metrics_addr: str | None = None,
                   transparent: "TransparentOptions | None" = None) -> int:
    """``--mode auto``: every mapping starts on the userland path and moves itself to the
    kernel path (hybrid) and back with its load, through the daemon's autopilot and live
    switch; the nft table, if one was made, goes at the stop."""
    from .controller import autopilot, plan
    from .controller.auto import AutoPolicy

    stop = stop_signal()
    realiser, steps = _realiser(mappings, "userland", options, kernel, set_sysctls, transparent)
    target = plan.Target(options, transparent=transparent is not None)
    policies = {m: AutoPolicy(thresholds) for m in mappings}

    async def move(mapping: Mapping, place: str) -> None:
        policy = policies[mapping]
        await realiser.run(plan.switch(mapping, policy.place, place, True, target, kernel))  # type: ignore[arg-type]
        policy.moved(place)  # type: ignore[arg-type]
        log.info("auto: moved %s from %s to %s", mapping, "hybrid" if place == "userland" else "userland", place)

    def snapshot() -> list["MappingSnapshot"]:
        from .metrics.snapshot import KernelCounterReader, mapping_snapshot

        counters = KernelCounterReader(kernel).read(realiser.kernel_ids()) if realiser.kernel is not None else {}
        stats = dict(realiser.proxy.stats)
        return [mapping_snapshot(m, "auto", stats, counters, auto=(policies[m].place, policies[m].moves))
                for m in mappings]

    try:
        await realiser.run(steps)
        metrics = _start_metrics(metrics_addr, snapshot)
    except PortproxyError as exc:
        print(f"portproxy: {exc}", file=sys.stderr)
        await realiser.stop(keep_kernel_rules=True, drain_timeout=0)
        return 1
    for mapping in mappings:
        for part in mapping.per_family():
            print_ready(part, out, " (auto)")
    pilot = asyncio.get_running_loop().create_task(
        autopilot.run(realiser, kernel, lambda: policies.items(), move))
    signum = await stop
    pilot.cancel()
    log.info("%s: draining %d connection(s) for up to %gs", signal.Signals(signum).name,
             realiser.proxy.connection_count(), options.drain_timeout)
    ok = await realiser.stop(keep_kernel_rules=False)
    if metrics is not None:
        metrics.shutdown()  # type: ignore[attr-defined]
    return 0 if ok else 1


def _realiser(mappings: list[Mapping], mode: "Mode", options: ProxyOptions, kernel: "KernelOptions",
              set_sysctls: bool = False, transparent: "TransparentOptions | None" = None) -> tuple["Realiser", list]:
    """The daemon's realiser for this process's mappings, and the plan that starts them all."""
    from .controller import plan
    from .controller.config import DaemonOptions
    from .controller.realiser import Realiser

    realiser = Realiser(asyncio.get_running_loop(), DaemonOptions(proxy=options, kernel=kernel,
                                                                  set_sysctls=set_sysctls), transparent)
    target = plan.Target(options, transparent=transparent is not None)
    return realiser, plan.foreground(mappings, mode, target, kernel)


async def run_kernel(mappings: list[Mapping], opts: "KernelOptions", set_sysctls: bool,
                     out: TextIO = sys.stdout, metrics_addr: str | None = None,
                     proxy_options: ProxyOptions = ProxyOptions()) -> int:
    """Install the mappings as nftables rules, hold them until a stop signal, then remove them.

    The published ports are held (bound, not listening) for as long as the DNAT is in,
    so no other program can take them: a port someone else holds is refused here too.
    A family DNAT cannot translate (an IPv6 client to an IPv4 target) is proxied."""
    from .kernel.builders import why_not_translated
    from .metrics.snapshot import KernelCounterReader, mapping_snapshot

    stop = stop_signal()
    realiser, steps = _realiser(mappings, "kernel", proxy_options, opts, set_sysctls)
    try:
        await realiser.run(steps)
    except PortproxyError as exc:
        print(f"portproxy: {exc}", file=sys.stderr)
        await realiser.stop(keep_kernel_rules=True, drain_timeout=0)  # the failed plan took its DNAT out
        return exc.exit_status
    reader = KernelCounterReader(opts)

    def snapshot() -> list[MappingSnapshot]:
        counters = reader.read(realiser.kernel_ids())
        stats = dict(realiser.proxy.stats)
        return [mapping_snapshot(m, "kernel", stats, counters) for m in mappings]

    try:
        metrics = _start_metrics(metrics_addr, snapshot)
    except ProxyError as exc:
        print(f"portproxy: {exc}", file=sys.stderr)
        await realiser.stop(keep_kernel_rules=False, drain_timeout=0)
        return 1
    for mapping in mappings:
        for part in mapping.per_family():
            reason = why_not_translated(part, opts)
            print_ready(part, out, f" (userland: {reason})" if reason else " (kernel)")
    await stop
    if metrics is not None:
        metrics.shutdown()  # type: ignore[attr-defined]
    return 0 if await realiser.stop(keep_kernel_rules=False, drain_timeout=0) else 1
