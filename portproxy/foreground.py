"""``portproxy map``: run the given mappings in the foreground until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import TextIO

from .proxy import ProxyOptions, ProxyServer
from .proxy.server import ProxyError, listener_name
from .spec import Mapping

log = logging.getLogger("portproxy")


def print_ready(mapping: Mapping, out: TextIO) -> None:
    """One ``ready`` line per host port: scripts wait for these before sending traffic."""
    for host_port, target_port in mapping.port_pairs():
        print(f"ready {listener_name(mapping, host_port, target_port)}", file=out, flush=True)


async def wait_for_stop_signal() -> int:
    """Wait for SIGINT or SIGTERM; return the signal number."""
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[int] = loop.create_future()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, lambda s=signum: stop.done() or stop.set_result(s))
    try:
        return await stop
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


async def run_userland(mappings: list[Mapping], options: ProxyOptions, out: TextIO = sys.stdout) -> int:
    """Start every mapping (all or nothing), print ready lines, serve until a stop signal."""
    server = ProxyServer(asyncio.get_running_loop(), options)
    try:
        for mapping in mappings:
            server.add(mapping)
    except ProxyError as exc:
        print(f"portproxy: {exc}", file=sys.stderr)
        await server.stop(drain_timeout=0)
        return 1
    for mapping in mappings:
        print_ready(mapping, out)
    signum = await wait_for_stop_signal()
    log.info("%s: draining %d connection(s) for up to %gs", signal.Signals(signum).name,
             server.connection_count(), options.drain_timeout)
    await server.stop()
    return 0
