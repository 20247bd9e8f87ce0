"""A ProxyServer run in-process inside the host namespace of a topology."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import uvloop

from portproxy.lab.topology import DemoTopology
from portproxy.proxy import ProxyOptions, ProxyServer


def run_in_host(topo: DemoTopology, body: Callable[[ProxyServer], Awaitable[None]],
                options: ProxyOptions | None = None) -> None:
    """Run ``body(server)`` on a fresh uvloop loop inside the host namespace."""

    async def main() -> None:
        server = ProxyServer(asyncio.get_running_loop(), options or ProxyOptions(drain_timeout=1))
        try:
            await body(server)
        finally:
            await server.stop(drain_timeout=0)

    def thread() -> None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())

    topo.host.run(thread)
