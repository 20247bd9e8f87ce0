"""The controller: owns the mappings, runs each on the userland or kernel path, switches them live.

A mapping's mode is a set of *components*:

* ``userland`` — a proxy listener on the mapping's own address;
* ``kernel``   — its DNAT in the nft table;
* ``hybrid``   — the DNAT, plus a proxy listener on loopback (127.0.0.1 / ::1), which DNAT
  cannot serve without route_localnet. This is the shape of Docker's default set-up.

Every change (add, remove, switch) is a move from one component set to another,
always *make before break*: new components are added first — a listener bound
beside the old one (SO_REUSEPORT), a DNAT installed in front of a listener — and
only then are the old ones taken away. NAT is decided on a flow's first packet, so
connections the proxy already relays keep reaching it after the DNAT goes in, and
DNAT'd connections keep their translation in conntrack after it goes out; a retired
listener first accepts whatever is in its queue and keeps relaying until its
connections end. UDP conntrack entries for the port are deleted once a move that
involved the kernel is complete, so UDP flows move too. If adding a component fails, the ones added so far
are taken away again and the mapping stays exactly as it was.

Netlink and libnftables block, and pyroute2 cannot run on a uvloop loop: all of
that runs on one worker thread (which also serialises it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import ipaddress
import logging
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from ..kernel import KernelMappingError, KernelPath, NftError
from ..kernel.builders import check_mapping
from ..kernel.hairpin import HairpinError
from ..kernel.sysctls import SysctlError, ensure, required
from ..proxy.server import ProxyError, ProxyServer
from ..proxy.stats import TO_CLIENT, TO_TARGET, TcpStats, UdpStats
from ..spec import Mapping, SpecError, check_no_overlap, parse_spec
from .config import Config, DaemonOptions, Mode, parse_mode
from .state import StateStore

if TYPE_CHECKING:
    from ..metrics.snapshot import MappingSnapshot

log = logging.getLogger("portproxy.controller")
T = TypeVar("T")

SWITCH_GRACE = 0.2
"""Seconds a listener keeps accepting after the DNAT in front of it went in, so that
handshakes already under way when the rule landed complete against it."""


class ControlError(Exception):
    """A refused operation: an HTTP status and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class Entry:
    mode: Mode
    source: str
    """"config" (owned by the config file, changed by reload) or "api"."""


Component = tuple[str, Mapping]
"""("listener", mapping the proxy listens for) or ("kernel", mapping in the nft table)."""


def loopback_variant(m: Mapping) -> Mapping | None:
    """The loopback listener of a hybrid mapping (None when it names a host address)."""
    if m.host_ip is not None and not m.host_ip.is_unspecified:
        return None
    ip = ipaddress.IPv4Address("127.0.0.1") if m.family == 4 else ipaddress.IPv6Address("::1")
    return dataclasses.replace(m, host_ip=ip)


def components(m: Mapping, mode: Mode) -> set[Component]:
    if mode == "userland":
        return {("listener", m)}
    if mode == "kernel":
        return {("kernel", m)}
    loopback = loopback_variant(m)
    return {("kernel", m)} | ({("listener", loopback)} if loopback else set())


class Controller:
    def __init__(self, loop: asyncio.AbstractEventLoop, options: DaemonOptions, store: StateStore | None) -> None:
        self.loop = loop
        self.options = options
        self.store = store
        self.proxy = ProxyServer(loop, options.proxy)
        self.proxy.reuse_port = True
        self.entries: dict[Mapping, Entry] = {}
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="portproxy-netlink")
        self._kernel: KernelPath | None = None
        self._lock = asyncio.Lock()
        self._metrics_reader: Any = None
        self.on_change: Callable[[], None] | None = None
        """Called after every committed change (the daemon updates systemd's STATUS=)."""

    # --- the worker thread ----------------------------------------------------------
    async def _in_worker(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.loop.run_in_executor(self._worker, fn, *args)

    async def _kernel_path(self) -> KernelPath:
        if self._kernel is None:
            try:
                self._kernel = await self._in_worker(KernelPath, self.options.kernel)
            except NftError as exc:
                raise ControlError(503, str(exc)) from None
        return self._kernel

    # --- components ---------------------------------------------------------------------
    async def _add_component(self, component: Component) -> None:
        kind, m = component
        if kind == "listener":
            try:
                self.proxy.add(m)
            except ProxyError as exc:
                raise ControlError(409, str(exc)) from None
            return
        kernel = await self._kernel_path()

        def install() -> None:
            ensure(required([m], self.options.kernel.route_localnet), self.options.set_sysctls)
            kernel.add(m)
            try:
                kernel.enable_hairpin([m])
            except HairpinError:
                kernel.remove(m)
                raise

        try:
            await self._in_worker(install)
        except KernelMappingError as exc:
            raise ControlError(400, str(exc)) from None
        except (NftError, SysctlError, HairpinError) as exc:
            raise ControlError(500, str(exc)) from None

    async def _remove_component(self, component: Component) -> None:
        kind, m = component
        if kind == "listener":
            if m in self.proxy.listeners:
                self.proxy.retire(m)
            return
        kernel = await self._kernel_path()

        try:
            await self._in_worker(kernel.remove, m)
        except NftError as exc:
            raise ControlError(500, str(exc)) from None

    async def _move(self, old: set[Component], new: set[Component]) -> None:
        """Make before break; on a failed add, undo the adds and leave ``old`` in place."""
        to_add = sorted(new - old, key=lambda c: c[0] != "kernel")  # DNAT first, then listeners
        to_remove = sorted(old - new, key=lambda c: c[0] != "kernel")
        added: list[Component] = []
        try:
            for component in to_add:
                await self._add_component(component)
                added.append(component)
        except ControlError:
            for component in reversed(added):
                try:
                    await self._remove_component(component)
                except ControlError as exc:
                    log.error("rollback of %s %s failed: %s", component[0], component[1], exc)
            await self._forget_udp_flows([m for kind, m in added if kind == "kernel"], old)
            raise
        if any(kind == "kernel" for kind, _ in added) and any(kind == "listener" for kind, _ in to_remove):
            await asyncio.sleep(SWITCH_GRACE)
        for component in to_remove:
            await self._remove_component(component)
        await self._forget_udp_flows([m for kind, m in to_add + to_remove if kind == "kernel"], new)

    async def _forget_udp_flows(self, mappings: list[Mapping], now: set[Component]) -> None:
        """Delete the port's UDP conntrack entries once the move is complete, so every UDP
        flow takes the new path (``now``'s). Not earlier: a reply the old listener sends while
        it is still open would create a fresh untranslated entry, and the client's flow would
        keep arriving at a closed port."""
        udp = [m for m in mappings if m.proto == "udp"]
        if udp:
            translated = any(kind == "kernel" for kind, _ in now)  # else no DNAT may remain
            try:
                await self._in_worker(KernelPath.forget_udp_flows, udp, translated)
            except Exception as exc:  # noqa: BLE001 - flows then move when their entries time out
                log.warning("deleting UDP conntrack entries failed: %s", exc)

    # --- persistence ----------------------------------------------------------------------
    def _persist(self) -> None:
        if self.store is not None:
            self.store.save({m: (e.mode, e.source) for m, e in self.entries.items()})

    async def _commit(self, change: Callable[[], None], undo: Callable[[], Any]) -> None:
        """Record a change in the entries and on disk; if the disk refuses, undo it all."""
        change()
        try:
            self._persist()
        except OSError as exc:
            await undo()
            raise ControlError(500, f"cannot save state: {exc.strerror}") from None
        if self.on_change is not None:
            self.on_change()

    # --- operations -------------------------------------------------------------------------
    def resolve(self, name: str) -> Mapping:
        """A mapping named by its full spec, or by HOST_PORT[/PROTO] when that is unambiguous."""
        try:
            wanted = parse_spec(name)
        except SpecError:
            wanted = None
        if wanted is not None:
            if wanted in self.entries:
                return wanted
            raise ControlError(404, f"no mapping {wanted}")
        port_text, _, proto = name.strip().partition("/")
        if not port_text.isdigit() or proto not in ("", "tcp", "udp"):
            raise ControlError(400, f"{name!r} is neither a mapping spec nor HOST_PORT[/PROTO]")
        port = int(port_text)
        found = [m for m in self.entries if m.host_port <= port <= m.host_port_end and (not proto or m.proto == proto)]
        if not found:
            raise ControlError(404, f"no mapping on port {name}")
        if len(found) > 1:
            raise ControlError(409, f"port {name} is ambiguous: {', '.join(str(m) for m in found)}")
        return found[0]

    async def add(self, spec: str, mode: str = "userland", source: str = "api") -> Mapping:
        try:
            mapping = parse_spec(spec)
        except SpecError as exc:
            raise ControlError(400, str(exc)) from None
        try:
            checked_mode = parse_mode(mode, "mode")
        except Exception as exc:  # noqa: BLE001 - ConfigError with one line
            raise ControlError(400, str(exc)) from None
        async with self._lock:
            if mapping in self.entries:
                raise ControlError(409, f"mapping {mapping} exists already")
            try:
                check_no_overlap([*self.entries, mapping])
            except SpecError as exc:
                raise ControlError(409, str(exc)) from None
            await self._move(set(), components(mapping, checked_mode))
            await self._commit(lambda: self.entries.__setitem__(mapping, Entry(checked_mode, source)),
                               lambda: self._undo_add(mapping, checked_mode))
            log.info("added %s (%s)", mapping, checked_mode)
            return mapping

    async def _undo_add(self, mapping: Mapping, mode: Mode) -> None:
        self.entries.pop(mapping, None)
        await self._move(components(mapping, mode), set())

    async def remove(self, name: str) -> Mapping:
        async with self._lock:
            mapping = self.resolve(name)
            entry = self.entries[mapping]
            await self._move(components(mapping, entry.mode), set())
            await self._commit(lambda: self.entries.pop(mapping), lambda: self._move(set(), components(mapping, entry.mode)))
            for m in (mapping, loopback_variant(mapping)):
                if m is not None:
                    self.proxy.forget_stats(m)  # its series disappear
            log.info("removed %s", mapping)
            return mapping

    async def switch(self, name: str, mode: str) -> Mapping:
        try:
            new_mode = parse_mode(mode, "mode")
        except Exception as exc:  # noqa: BLE001
            raise ControlError(400, str(exc)) from None
        async with self._lock:
            mapping = self.resolve(name)
            entry = self.entries[mapping]
            old_mode = entry.mode
            if old_mode == new_mode:
                return mapping
            await self._move(components(mapping, old_mode), components(mapping, new_mode))

            def change() -> None:
                entry.mode = new_mode

            async def undo() -> None:
                entry.mode = old_mode
                await self._move(components(mapping, new_mode), components(mapping, old_mode))

            await self._commit(change, undo)
            log.info("switched %s: %s -> %s", mapping, old_mode, new_mode)
            return mapping

    async def reload(self, config: Config) -> dict[str, list[str]]:
        """Apply only the difference between the running config mappings and ``config``."""
        report: dict[str, list[str]] = {"added": [], "removed": [], "switched": [], "errors": []}
        current = {m: e for m, e in self.entries.items() if e.source == "config"}
        for mapping in [m for m in current if m not in config.mappings]:
            await self._record(report, "removed", mapping, self.remove(str(mapping)))
        for mapping, mode in config.mappings.items():
            if mapping not in self.entries:
                await self._record(report, "added", mapping, self.add(str(mapping), mode, source="config"))
            elif self.entries[mapping].mode != mode:
                await self._record(report, "switched", mapping, self.switch(str(mapping), mode))
        return report

    @staticmethod
    async def _record(report: dict[str, list[str]], what: str, mapping: Mapping, op: Any) -> None:
        try:
            await op
            report[what].append(str(mapping))
        except ControlError as exc:
            report["errors"].append(f"{mapping}: {exc}")
            log.error("reload: %s: %s", mapping, exc)

    # --- start and stop ---------------------------------------------------------------------------
    async def start(self, config: Config) -> list[str]:
        """Reconcile: config mappings plus API mappings from the saved state.

        Kernel mappings go in as one atomic batch that also replaces whatever a crashed
        run left in the table; then the listeners. A mapping that cannot start is
        reported (one line each) and left out; the others start.
        """
        saved = self.store.load() if self.store is not None else None
        desired: dict[Mapping, Entry] = {}
        for mapping, (mode, source) in (saved or {}).items():
            if source == "api":
                desired[mapping] = Entry(mode, source)
        for mapping, mode in config.mappings.items():
            desired[mapping] = Entry(mode, "config")
        try:
            check_no_overlap(list(desired))
        except SpecError as exc:
            raise ControlError(409, f"saved and configured mappings conflict: {exc}") from None
        errors: list[str] = []
        kernel_mappings = [m for m, e in desired.items() if e.mode != "userland"]
        try:
            kernel = await self._kernel_path()
            for m in kernel_mappings:
                check_mapping(m)
            await self._in_worker(self._install_all, kernel, kernel_mappings)
        except (ControlError, NftError, SysctlError, HairpinError, KernelMappingError) as exc:
            # Without kernel mappings this is fine (no CAP_NET_ADMIN, say): nothing to install.
            for m in kernel_mappings:
                errors.append(f"{m}: {exc}")
                desired.pop(m)
        for mapping, entry in list(desired.items()):
            for kind, m in components(mapping, entry.mode):
                if kind == "listener":
                    try:
                        self.proxy.add(m)
                    except ProxyError as exc:
                        errors.append(f"{mapping}: {exc}")
                        desired.pop(mapping)
                        if entry.mode != "userland" and self._kernel is not None:
                            await self._in_worker(self._kernel.remove, mapping)
        self.entries = desired
        self._persist()
        for error in errors:
            log.error("not started: %s", error)
        return errors

    def _install_all(self, kernel: KernelPath, mappings: list[Mapping]) -> None:
        if mappings:
            ensure(required(mappings, self.options.kernel.route_localnet), self.options.set_sysctls)
            kernel.install(mappings)
            kernel.enable_hairpin(mappings)
            kernel.forget_udp_flows(mappings, translated=True)
        elif kernel.table_present():
            kernel.teardown()  # left over from a previous run

    async def stop(self, keep_kernel_rules: bool | None = None) -> None:
        """Drain userland connections; remove the kernel table unless told to keep it."""
        keep = self.options.keep_kernel_rules if keep_kernel_rules is None else keep_kernel_rules
        await self.proxy.stop()
        if self._kernel is not None and not keep:
            kernel = self._kernel
            mappings = list(kernel.ids)

            def teardown() -> None:
                kernel.teardown()
                kernel.forget_udp_flows(mappings, translated=False)

            try:
                await self._in_worker(teardown)
            except NftError as exc:
                log.error("removing the kernel rules failed: %s", exc)
        self._worker.shutdown(wait=True)

    # --- reading ------------------------------------------------------------------------------------
    def _userland_stats(self, mapping: Mapping, stats: dict[Mapping, list]) -> list[TcpStats | UdpStats]:
        """Counter objects of a mapping's listeners, a hybrid's loopback listener included.

        They are kept per mapping by the proxy, so they also cover connections a retired
        listener still relays, and never go backwards across switches."""
        userland = [*stats.get(mapping, [])]
        loopback = loopback_variant(mapping)
        if loopback is not None:
            userland += stats.get(loopback, [])
        return userland

    def metrics_snapshot(self) -> list["MappingSnapshot"]:
        """Called on the metrics thread: copies first (the loop thread may be changing things)."""
        from ..metrics.snapshot import KernelCounterReader, MappingSnapshot

        entries = [(m, e.mode) for m, e in list(self.entries.items())]
        stats = dict(self.proxy.stats)
        kernel_counters = {}
        if self._kernel is not None:
            if self._metrics_reader is None:
                self._metrics_reader = KernelCounterReader(self.options.kernel)
            kernel_counters = self._metrics_reader.read(dict(self._kernel.ids))
        return [MappingSnapshot(m, mode, self._userland_stats(m, stats), kernel_counters.get(m)) for m, mode in entries]

    async def describe(self) -> list[dict[str, Any]]:
        counters = {}
        if self._kernel is not None and self._kernel.ids:
            try:
                counters = await self._in_worker(self._kernel.counters)
            except NftError as exc:
                log.warning("reading kernel counters failed: %s", exc)
        result = []
        for mapping, entry in sorted(self.entries.items()):
            item: dict[str, Any] = {"spec": str(mapping), "mode": entry.mode, "source": entry.source}
            userland = self._userland_stats(mapping, self.proxy.stats)
            tcp = [s for s in userland if isinstance(s, TcpStats)]
            udp = [s for s in userland if isinstance(s, UdpStats)]
            item["userland"] = {
                "connections": sum(s.active for s in tcp),
                "accepted": sum(s.accepted for s in tcp),
                "bytes_to_target": sum(s.bytes[TO_TARGET] for s in tcp) + sum(s.bytes_to_target for s in udp),
                "bytes_to_client": sum(s.bytes[TO_CLIENT] for s in tcp) + sum(s.bytes_to_client for s in udp),
                "udp_flows": sum(s.flows_active for s in udp),
            }
            kernel = counters.get(mapping)
            if kernel is not None:
                item["kernel"] = {**dataclasses.asdict(kernel), "packets": kernel.packets, "bytes": kernel.bytes}
            result.append(item)
        return result


__all__ = ["Config", "ControlError", "Controller", "Entry", "components", "loopback_variant"]
