"""Keeping reality as desired: retrying failed mappings, checking the nft table and transparent
mode's routing, and saving the state again once the disk takes it."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .. import offloop
from . import autopilot
from ..errors import PortproxyError

if TYPE_CHECKING:
    from .core import Controller

log = logging.getLogger("portproxy.controller")

RECONCILE_INTERVAL = 3.0
"""Seconds between checks that the nft table is still what portproxy installed."""
RETRY_FIRST, RETRY_MAX = 1.0, 60.0
"""Back-off of a failed mapping's retries: doubling from the first to the most."""
SAVE_RETRY = 2.0
"""Seconds between attempts to save a state the disk refused."""


class Upkeep:
    def __init__(self, controller: "Controller") -> None:
        self.controller = controller
        self.reconciles = 0
        """Times the nft table or the routing was found deleted or altered and reinstalled."""
        self.kernel_problem: str | None = None
        """What the last check found wrong with the nft table (None: as installed)."""
        self.routing_problem: str | None = None
        """What keeps transparent mode's replies from reaching the proxy that reinstalling
        cannot fix (another program's ip rule taking them first), or None."""
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        loop = self.controller.loop
        c = self.controller

        async def move(mapping, place: str) -> None:
            entry = c.entries.get(mapping)
            if entry is not None:
                await c.auto_move(mapping, entry, place)

        pilot = autopilot.run(c.realiser, c.options.kernel,
                              lambda: [(m, e.auto) for m, e in c.auto_entries()], move)
        self._tasks = [loop.create_task(self._retry_loop()), loop.create_task(self._reconcile_loop()),
                       loop.create_task(pilot)]

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()

    async def _retry_loop(self) -> None:
        """Failed mappings, when their back-off is over; and a refused save, until it succeeds."""
        c = self.controller
        next_save = 0.0
        while True:
            await asyncio.sleep(RETRY_FIRST / 2)
            now = c.loop.time()
            due = [(m, e) for m, e in c.entries.items() if e.status == "failed" and e.retry_at <= now]
            for mapping, entry in due:
                async with c.lock:
                    if c.entries.get(mapping) is entry and entry.status == "failed":
                        if await c.realise(mapping, entry):
                            c.save_quietly()
                            c._changed()
            if c.save_error is not None and now >= next_save:
                next_save = now + SAVE_RETRY
                async with c.lock:
                    if c.save_error is not None:
                        c.save_quietly()

    async def _reconcile_loop(self) -> None:
        """The quick check every few seconds; the deep one (rule counts) as often as its
        cost allows: at most ~5 % of the worker's time."""
        loop = self.controller.loop
        next_deep = 0.0
        while True:
            await asyncio.sleep(RECONCILE_INTERVAL)
            deep = loop.time() >= next_deep
            started = loop.time()
            try:
                await self.reconcile(deep)
            except Exception as exc:  # noqa: BLE001 - the loop must survive a bad moment
                log.error("checking the nft table failed: %s", exc)
            if deep:
                next_deep = loop.time() + max(RECONCILE_INTERVAL, 20 * (loop.time() - started))

    async def reconcile(self, deep: bool = True) -> None:
        """Reinstall the nft table, and transparent mode's routing, if someone deleted or
        altered them (one line each, counted)."""
        c = self.controller
        await self._reconcile_routing()
        kernel = c.realiser.kernel
        if kernel is None or not kernel.ids:
            return
        # Read outside the lock and off the worker: a deep check of a large table takes
        # seconds, and ls, add or switch must not wait for it.
        problem = await offloop.run(kernel.health, deep)
        self.kernel_problem = problem
        if problem is None:
            return
        async with c.lock:
            problem = await c.realiser.in_worker(kernel.health, deep)
            if problem is None:
                self.kernel_problem = None
                return
            try:
                count = await c.realiser.reinstall_table()
            except PortproxyError as exc:
                log.error("%s; reinstalling it failed: %s", problem, exc)
                return
            self.reconciles += 1
            self.kernel_problem = None
            log.warning("%s; reinstalled it with %d mapping(s)", problem, count)

    async def _reconcile_routing(self) -> None:
        c = self.controller
        routing = c.realiser.routing
        if routing is None:
            self.routing_problem = None
            return
        problem = await offloop.run(routing.problem)
        if problem != self.routing_problem:  # one line per change, not one per check
            if problem:
                log.error("transparent mode: %s", problem)
            else:
                log.info("transparent mode: its replies reach the proxy again")
            self.routing_problem = problem
        if problem is not None:
            return  # reinstalling cannot help, and nothing of the other program's is touched
        if await offloop.run(routing.present):
            return
        async with c.lock:
            if c.realiser.routing is not routing:
                return
            try:
                await c.realiser.in_worker(routing.install)
            except PortproxyError as exc:
                log.error("transparent mode's routing was removed; reinstalling it failed: %s", exc)
                return
            self.reconciles += 1
            log.warning("transparent mode's routing (ip rule, table %d or marking rule) was removed; reinstalled it",
                        routing.opts.table)
