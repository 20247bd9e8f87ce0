"""The realiser: runs the controller's plans on the real paths, with one undo stack.

It owns everything a mapping runs on: the :class:`~portproxy.proxy.server.ProxyServer`,
the nft table (a :class:`~portproxy.kernel.path.KernelPath`, created on first use: it
takes the table's lock), transparent mode's routing, and the one worker thread that
netlink and libnftables block on (pyroute2 cannot run on a uvloop loop; the thread also
serialises them).

:meth:`Realiser.run` is a transaction in the shape of firewalld's: each step that ran
pushes its inverse; when a step fails, the inverses run in reverse (each failure of one
is one log line) and the error goes to the caller, so the paths are exactly as before.
A :class:`~.plan.Commit` step calls the caller's commit (saving the desired state): a
refusal there undoes the steps before it; a step failing after it undoes everything and
calls the caller's ``uncommit``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

from .. import offloop, schema
from ..errors import PortproxyError
from ..spec import Mapping, Part
from .plan import (ClearTable, Commit, Dnat, DnatPresent, EnsureRouting, ForgetStats, ForgetUdp, Grace, Hairpin,
                   Hold, InstallTable, Pause, Release, Serve, Step)

if TYPE_CHECKING:
    from ..kernel.path import KernelPath
    from ..kernel.transparent import SharedRouting
    from .config import DaemonOptions
    from ..kernel.transparent_rules import TransparentOptions

log = logging.getLogger("portproxy.controller")
T = TypeVar("T")


class Realiser:
    def __init__(self, loop: asyncio.AbstractEventLoop, options: DaemonOptions,
                 transparent: TransparentOptions | None = None) -> None:
        from ..proxy.server import ProxyServer

        self.loop = loop
        self.options = options
        self.transparent = transparent
        """Transparent mode's routing options (default: from the daemon's options)."""
        self.proxy = ProxyServer(loop, options.proxy)
        self._worker = offloop.Worker("portproxy-netlink")
        self.kernel: KernelPath | None = None
        """The nft table, once a step or the start needed it."""
        self.routing: SharedRouting | None = None
        """Transparent mode's routing, installed while a transparent listener needs it."""

    # --- the worker thread and what it owns ---------------------------------------------------
    async def in_worker(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._worker.run(fn, *args)

    async def kernel_path(self) -> KernelPath:
        if self.kernel is None:
            from ..kernel.path import KernelPath  # here: a userland-only process never loads libnftables' wrapper

            self.kernel = await self.in_worker(KernelPath, self.options.kernel)
        return self.kernel

    def kernel_ids(self) -> dict[Part, int]:
        return dict(self.kernel.ids) if self.kernel is not None else {}

    def kernel_id(self, mapping: Mapping, default: int | None = None) -> int | None:
        """The id the nft table gave one of the mapping's families (kept across restarts)."""
        ids = self.kernel.ids if self.kernel is not None else {}
        return next((ids[p] for p in mapping.per_family() if p in ids), default)

    # --- a plan --------------------------------------------------------------------------------
    async def run(self, steps: Sequence[Step], *, sockets: dict[int, socket.socket] | None = None,
                  commit: Callable[[], None] | None = None, uncommit: Callable[[], None] | None = None) -> None:
        """Run ``steps`` in order, all or nothing (see the module)."""
        undo: list[Step] = []
        committed = False
        try:
            for step in steps:
                if isinstance(step, Commit):
                    if commit is not None:
                        commit()
                    committed = True
                    continue
                inverse = await self._do(step, sockets)
                if inverse is not None:
                    undo.append(inverse)
        except PortproxyError:
            for inverse in reversed(undo):
                try:
                    await self._do(inverse, None)
                except PortproxyError as exc:
                    log.error("undoing %s failed: %s", _describe(inverse), exc)
            if committed and uncommit is not None:
                uncommit()
            raise

    async def _do(self, step: Step, sockets: dict[int, socket.socket] | None) -> Step | None:
        """Run one step; return its inverse (None: nothing to undo)."""
        proxy = self.proxy
        if isinstance(step, Hold):
            proxy.add(step.part, sockets=sockets, options=step.options, serve=step.serve)
            return Release(step.part, step.options)
        if isinstance(step, Release):
            if step.part not in proxy:
                return None
            serving = proxy.serving(step.part)
            proxy.remove(step.part)
            return Hold(step.part, step.options, serving)
        if isinstance(step, Serve):
            if proxy.serving(step.part):
                return None
            proxy.serve(step.part)
            return Pause(step.part)
        if isinstance(step, Pause):
            if step.part not in proxy or not proxy.serving(step.part):
                return None
            proxy.hold(step.part)
            return Serve(step.part)
        if isinstance(step, Dnat):
            return await self._dnat(step)
        if isinstance(step, DnatPresent):
            return Dnat(remove=step.parts)
        if isinstance(step, Hairpin):
            from ..kernel import hairpin

            await self.in_worker(hairpin.enable_for, list(step.parts))
            return None
        if isinstance(step, InstallTable):
            kernel = await self.kernel_path()
            await self.in_worker(lambda: kernel.apply(step.parts, replace=True, set_sysctls=self.options.set_sysctls,
                                                      preferred_ids=dict(step.preferred)))
            return ClearTable()
        if isinstance(step, ClearTable):
            kernel = await self.kernel_path()
            if await self.in_worker(kernel.table_present):
                await self.in_worker(kernel.teardown)
            return None
        if isinstance(step, Grace):
            await asyncio.sleep(step.seconds)
            return None
        if isinstance(step, ForgetUdp):
            await self.forget_udp_flows(step.parts, step.translated)
            return None
        if isinstance(step, ForgetStats):
            for part in step.parts:
                proxy.forget_stats(part)  # its series disappear
            return None
        if isinstance(step, EnsureRouting):
            await self.ensure_routing()
            return None
        raise TypeError(f"not a step: {step!r}")

    async def _dnat(self, step: Dnat) -> Step | None:
        if not step.add and not step.remove:
            return None
        kernel = await self.kernel_path()
        before = dict(kernel.ids)
        await self.in_worker(lambda: kernel.apply(step.add, step.remove, set_sysctls=self.options.set_sysctls,
                                                  preferred_ids=dict(step.preferred)))
        added = tuple(p for p in step.add if p not in before)
        removed = tuple(p for p in step.remove if p in before)
        return Dnat(add=removed, remove=added, preferred=tuple((p, before[p]) for p in removed))

    async def forget_udp_flows(self, parts: Sequence[Part], translated: bool) -> None:
        """Delete the ports' UDP conntrack entries once a move is complete, so every UDP flow
        takes the new path. Not earlier: a reply the old listener sends while it is still
        open would create a fresh untranslated entry, and the client's flow would keep
        arriving at a closed port."""
        udp = [m for m in parts if m.proto == "udp"]
        if udp:
            from ..kernel.path import KernelPath

            try:
                await self.in_worker(KernelPath.forget_udp_flows, udp, translated)
            except Exception as exc:  # noqa: BLE001 - flows then move when their entries time out
                log.warning("deleting UDP conntrack entries failed: %s", exc)

    # --- transparent mode's routing --------------------------------------------------------------
    async def ensure_routing(self) -> None:
        if self.routing is not None:
            return
        from ..kernel.transparent import SharedRouting

        routing = SharedRouting(self.transparent or schema.transparent_options(dict(self.options.values)))
        await self.in_worker(routing.acquire)
        self.routing = routing
        log.info("transparent mode: installed the fwmark rule, routing table %d and the marking rule",
                 routing.opts.table)

    async def release_routing(self) -> None:
        """Remove the routing (the caller found that no running mapping needs it)."""
        if self.routing is None:
            return
        routing, self.routing = self.routing, None
        try:
            await self.in_worker(routing.release)
            log.info("transparent mode: removed its routing (no transparent mapping left)")
        except PortproxyError as exc:
            log.error("removing transparent mode's routing failed: %s", exc)

    # --- reinstalling what someone removed -------------------------------------------------------
    async def reinstall_table(self) -> int:
        """Rewrite the nft table whole with what it should hold; the number of mappings."""
        kernel = self.kernel
        assert kernel is not None
        mappings = list(kernel.ids)
        await self.in_worker(lambda: kernel.apply(mappings, replace=True, set_sysctls=self.options.set_sysctls,
                                                  preferred_ids=dict(kernel.ids)))
        return len(mappings)

    # --- the end -------------------------------------------------------------------------------
    async def stop(self, keep_kernel_rules: bool, drain_timeout: float | None = None) -> bool:
        """Drain userland connections (for the proxy's drain timeout unless given); remove the
        kernel table unless told to keep it; the routing goes. False if removing the table failed."""
        await self.proxy.stop(drain_timeout)
        kernel = self.kernel
        ok = True
        if kernel is not None and not keep_kernel_rules:
            mappings = list(kernel.ids)

            def teardown() -> None:
                kernel.teardown()
                kernel.forget_udp_flows(mappings, translated=False)

            try:
                await self.in_worker(teardown)
            except PortproxyError as exc:
                log.error("removing the kernel rules failed: %s", exc)
                ok = False
        if kernel is not None:
            kernel.close()
        if self.routing is not None:
            try:
                await self.in_worker(self.routing.release)
            except PortproxyError as exc:
                log.error("removing transparent mode's routing failed: %s", exc)
            self.routing = None
        self._worker.close()
        return ok


def _describe(step: Step) -> str:
    """A step in a log line: its kind and the families it touches."""
    parts = getattr(step, "parts", None) or (*getattr(step, "add", ()), *getattr(step, "remove", ()))
    if hasattr(step, "part"):
        parts = (step.part,)  # type: ignore[union-attr]
    return f"{type(step).__name__.lower()} {', '.join(map(str, parts))}".strip()


__all__ = ["Realiser"]
