"""The controller: owns the mappings, runs each on the userland or kernel path, switches them live.

A mapping's mode is a set of *components*:

* ``userland`` — a proxy listener on the mapping's address;
* ``kernel``   — its DNAT in the nft table;
* ``hybrid``   — both: the DNAT serves traffic from outside and to the host's own
  addresses, the listener what DNAT cannot (127.0.0.1 without route_localnet). This is
  the shape of Docker's default set-up (DNAT plus docker-proxy on the same port).

Whatever its mode, a mapping holds its host ports the whole time it exists: on the
kernel path its sockets stay bound but do not listen, so no other program can take a
published port, and a move back to the proxy only has to listen again.

Every change (add, remove, switch) is a move from one component set to another,
always *make before break*: the DNAT goes in before a listener stops, a listener
listens again before the DNAT goes. NAT is decided on a flow's first packet, so
connections the proxy already relays keep reaching it after the DNAT goes in, and
DNAT'd connections keep their translation in conntrack after it goes out; a paused
listener first accepts whatever is in its queue and keeps relaying until its
connections end. UDP conntrack entries for the port are deleted once a move that
involved the kernel is complete, so UDP flows move too. If a step fails, the steps
taken so far are undone and the mapping stays exactly as it was.

**Desired state is never destroyed by a failure to realise it.** What the operator
asked for (config, API, saved state) is kept in :attr:`Controller.entries`; a mapping
that cannot run (port held by another program, a sysctl off after a reboot) stays
there with status ``failed`` and its reason, is saved, shown, counted, and retried with
back-off until it runs or is removed. The kernel table is checked every few seconds
and reinstalled, with one log line, when someone deleted or flushed it.

Netlink and libnftables block, and pyroute2 cannot run on a uvloop loop: all of
that runs on one worker thread (which also serialises it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import errno
import logging
import socket
from typing import TYPE_CHECKING, Any, Callable, Collection, Iterable, Sequence, TypeVar

from ..errors import BadInput, Conflict, NotFound, PortproxyError, SystemFailure, shorten
from ..kernel.builders import KernelOptions, why_not_translated
from ..kernel.executor import NftError
from ..kernel.path import KernelPath
from ..proxy.options import ProxyOptions
from ..proxy.stats import TO_CLIENT, TO_TARGET, TcpStats, UdpStats
from ..spec import Mapping, SpecError, check_no_overlap, parse_spec
from .. import options as schema
from ..cni import adopt as cni_adopt
from .config import Config, DaemonOptions, Mode, Settings
from .state import SavedEntry, StateStore

if TYPE_CHECKING:
    from ..metrics.snapshot import MappingSnapshot

log = logging.getLogger("portproxy.controller")
T = TypeVar("T")

SWITCH_GRACE = 0.2
"""Seconds a listener keeps accepting after the DNAT in front of it went in, so that
handshakes already under way when the rule landed complete against it."""
RECONCILE_INTERVAL = 3.0
"""Seconds between checks that the nft table is still what portproxy installed."""
RETRY_FIRST, RETRY_MAX = 1.0, 60.0
"""Back-off of a failed mapping's retries: doubling from the first to the most."""

SOURCES = ("config", "api", "docker", "cni")
PERSISTED_SOURCES = ("api", "cni")
"""Config mappings come from the file each start; docker ones live as long as dockerd's proxy."""

LISTENER, KERNEL = "listener", "kernel"


def components(mode: Mode) -> set[str]:
    return {"userland": {LISTENER}, "kernel": {KERNEL}, "hybrid": {LISTENER, KERNEL}}[mode]


def part_components(part: Mapping, wanted: set[str], kernel: KernelOptions) -> set[str]:
    """What one family of a mapping runs: what its mode asks, except that what DNAT cannot
    serve (an IPv6 client to an IPv4 target: no NAT64; a loopback address) is proxied, as
    Docker does."""
    if wanted and why_not_translated(part, kernel):
        return {LISTENER}
    return wanted


@dataclasses.dataclass
class Entry:
    settings: Settings
    source: str
    """"config" (owned by the config file, changed by reload), "api", "docker", "cni"."""
    owner: dict[str, str] | None = None
    """Who asked for an owned mapping (a container: kind, id, name); removed with it."""
    status: str = "pending"
    """"running", or "failed" (then ``error`` says why and it is retried)."""
    error: str | None = None
    failures: int = 0
    retry_at: float = 0.0
    kernel_id: int | None = None
    """The mapping's id in the nft table, kept across restarts."""

    @property
    def mode(self) -> Mode:
        return self.settings.mode

    @property
    def holds_ports(self) -> bool:
        """Whether the mapping binds its host ports itself. A CNI runtime (podman's conmon)
        reserves the ports of its containers, so their mappings are DNAT only."""
        return self.source != "cni"


def source_of(owner: dict[str, str] | None) -> str:
    """The source of a mapping a request adds: the container engine that owns it, else the API."""
    return owner["kind"] if owner and owner.get("kind") in ("docker", "cni") else "api"


OWNER_IDENTITY = ("kind", "id", "ifname", "network")
"""What names the owner of a declared set (one CNI attachment); its other fields (the pod's
name and namespace) are for display, and a declaration updates them."""


def same_owner(a: dict[str, str] | None, b: dict[str, str]) -> bool:
    return a is not None and all(a.get(k, "") == b.get(k, "") for k in OWNER_IDENTITY)


@dataclasses.dataclass(frozen=True)
class OwnedPlan:
    """What declaring an owner's set of mappings changes: whole mappings, then the per-family
    parts that go in and out of the nft table."""

    add: list[Mapping]
    remove: list[Mapping]
    keep: list[Mapping]
    kernel_add: list[Mapping]
    kernel_remove: list[Mapping]


def plan_owned(current: dict[Mapping, Settings], wanted: dict[Mapping, Settings],
               installed: Collection[Mapping], kernel: KernelOptions) -> OwnedPlan:
    """From the owner's ``current`` mappings to ``wanted`` (pure).

    A mapping with the same spec and settings is kept, untouched. One whose options
    changed is removed and added again, and its DNAT, the same, stays where it is. The
    kernel parts of an added mapping are the families DNAT can serve: the others are
    skipped, as :meth:`Controller._move` skips them for a mapping that holds no ports (a
    CNI runtime publishes each family its container has). A removed mapping's parts go
    out only if ``installed``."""
    keep = [m for m, settings in wanted.items() if current.get(m) == settings]
    kept = set(keep)
    add = [m for m in wanted if m not in kept]
    remove = [m for m in current if m not in kept]
    add_parts = [p for m in add for p in m.per_family() if not why_not_translated(p, kernel)]
    adding = set(add_parts)
    return OwnedPlan(add, remove, keep, [p for p in add_parts if p not in installed],
                     [p for m in remove for p in m.per_family() if p in installed and p not in adding])


def validate_owner(owner: Any) -> dict[str, str] | None:
    if owner is None:
        return None
    if not isinstance(owner, dict) or not owner.get("id") or owner.get("kind") not in ("docker", "cni"):
        raise BadInput("owner must be an object with kind (docker or cni) and id")
    if len(owner) > 16 or not all(isinstance(k, str) and isinstance(v, str) and len(v) <= 256 for k, v in owner.items()):
        raise BadInput("owner fields must be at most 16 short strings")
    return dict(owner)


class Controller:
    def __init__(self, loop: asyncio.AbstractEventLoop, options: DaemonOptions, store: StateStore | None) -> None:
        from ..proxy.server import ProxyServer

        self.loop = loop
        self.options = options
        self.store = store
        self.proxy = ProxyServer(loop, options.proxy)
        self.entries: dict[Mapping, Entry] = {}
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="portproxy-netlink")
        self._kernel: KernelPath | None = None
        self._lock = asyncio.Lock()
        self._metrics_reader: Any = None
        self._tasks: list[asyncio.Task] = []
        self.reconciles = 0
        """Times the nft table was found deleted or altered and reinstalled."""
        self.kernel_problem: str | None = None
        """What the last check found wrong with the nft table (None: as installed)."""
        self._routing: Any = None
        """Transparent mode's routing (a SharedRouting), installed while a mapping with
        source = "client" has a listener, and only then."""
        self._departures_expected = False
        """Whether the DEL-while-away table is kept (from this daemon's first CNI mapping on)."""
        self.on_change: Callable[[], None] | None = None
        """Called after every committed change (the daemon updates systemd's STATUS=)."""

    # --- the worker thread ----------------------------------------------------------
    async def _in_worker(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.loop.run_in_executor(self._worker, fn, *args)

    async def _kernel_path(self) -> KernelPath:
        if self._kernel is None:
            self._kernel = await self._in_worker(KernelPath, self.options.kernel)
        return self._kernel

    def _part_components(self, part: Mapping, wanted: set[str]) -> set[str]:
        return part_components(part, wanted, self.options.kernel)

    def proxy_options(self, settings: Settings) -> ProxyOptions:
        return schema.proxy_options(dict(settings.overrides), self.options.proxy)

    def check_settings(self, mapping: Mapping, settings: Settings) -> None:
        """What no path can do for a mapping: a PROXY header on the kernel path."""
        from ..proxy.proxy_protocol import refusal

        reason = refusal(mapping.proto, settings.mode, self.proxy_options(settings).proxy_protocol)
        if reason:
            raise BadInput(f"mapping {mapping}: {reason}")

    # --- transparent mode's routing -------------------------------------------------------
    def _transparent(self, entry: Entry, wanted: set[str]) -> bool:
        return LISTENER in wanted and self.proxy_options(entry.settings).source == "client"

    async def _ensure_routing(self) -> None:
        """Install the routing before the first transparent listener (its replies need it)."""
        if self._routing is not None:
            return
        from ..kernel.transparent import SharedRouting

        routing = SharedRouting(schema.transparent_options(dict(self.options.values)))
        await self._in_worker(routing.acquire)
        self._routing = routing
        log.info("transparent mode: installed the fwmark rule, routing table %d and the marking rule",
                 routing.opts.table)

    async def _release_routing(self) -> None:
        """Remove the routing once no running mapping needs it."""
        if self._routing is None or any(self._transparent(e, components(e.mode)) for e in self.entries.values()
                                        if e.status == "running"):
            return
        routing, self._routing = self._routing, None
        try:
            await self._in_worker(routing.release)
            log.info("transparent mode: removed its routing (no transparent mapping left)")
        except PortproxyError as exc:
            log.error("removing transparent mode's routing failed: %s", exc)

    # --- moves ------------------------------------------------------------------------
    async def _kernel_batch(self, add: Sequence[Mapping], remove: Sequence[Mapping],
                            preferred: dict[Mapping, int], set_hairpin: bool = True) -> KernelPath | None:
        """DNAT in and out in one kernel transaction (none at all, and None, when there is
        nothing to do)."""
        if not add and not remove:
            return None
        kernel = await self._kernel_path()

        def apply() -> None:
            kernel.apply(add, remove, set_sysctls=self.options.set_sysctls, preferred_ids=preferred,
                         set_hairpin=set_hairpin)

        await self._in_worker(apply)
        return kernel

    async def _kernel_apply(self, entry: Entry, add: Sequence[Mapping] = (), remove: Sequence[Mapping] = ()) -> None:
        kernel = await self._kernel_batch(add, remove, {m: entry.kernel_id for m in add if entry.kernel_id})
        if kernel is not None:
            _note_kernel_id(entry, add, kernel)

    async def _move(self, m: Mapping, entry: Entry, old: set[str], new: set[str],
                    sockets: dict[int, socket.socket] | None = None) -> None:
        """Move every family of ``m`` from ``old`` to ``new``; if one fails, the families
        already moved go back, so the mapping stays exactly as it was."""
        if self._transparent(entry, new):
            await self._ensure_routing()
        done: list[Mapping] = []
        try:
            for part in m.per_family():
                if not entry.holds_ports and why_not_translated(part, self.options.kernel):
                    continue  # a CNI runtime publishes each family it has, through DNAT only
                await self._move_part(part, entry, self._part_components(part, old),
                                      self._part_components(part, new), sockets)
                done.append(part)
        except PortproxyError:
            for part in reversed(done):
                try:
                    await self._move_part(part, entry, self._part_components(part, new),
                                          self._part_components(part, old))
                except PortproxyError as exc:
                    log.error("undoing the move of %s failed: %s", part, exc)
            raise

    async def _move_part(self, m: Mapping, entry: Entry, old: set[str], new: set[str],
                         sockets: dict[int, socket.socket] | None = None) -> None:
        """Make before break; on a failed step, undo the steps taken and leave ``old`` in place."""
        if old == new:
            return
        undo: list[Callable[[], Any]] = []
        try:
            if entry.holds_ports and m not in self.proxy:
                # First, before any DNAT: a port someone else holds is refused on every path.
                self.proxy.add(m, sockets=sockets, options=self.proxy_options(entry.settings),
                               serve=LISTENER in new)
                undo.append(lambda: self.proxy.remove(m))
            if KERNEL in new - old:
                await self._kernel_apply(entry, add=[m])
                undo.append(lambda: self._kernel_apply(entry, remove=[m]))
            if LISTENER in new - old and not self.proxy.serving(m):
                self.proxy.serve(m)
                undo.append(lambda: self.proxy.hold(m))
        except PortproxyError:
            for step in reversed(undo):
                try:
                    result = step()
                    if asyncio.iscoroutine(result):
                        await result
                except PortproxyError as exc:
                    log.error("undoing a step of %s failed: %s", m, exc)
            raise
        if KERNEL in new - old and LISTENER in old - new:
            await asyncio.sleep(SWITCH_GRACE)
        if LISTENER in old - new and new and m in self.proxy:
            self.proxy.hold(m)  # the port stays ours while the DNAT serves it
        if not new and m in self.proxy:
            self.proxy.remove(m)
        if KERNEL in old - new:
            await self._kernel_apply(entry, remove=[m])
        if KERNEL in old ^ new:
            await self._forget_udp_flows([m], translated=KERNEL in new)

    async def _forget_udp_flows(self, mappings: list[Mapping], translated: bool) -> None:
        """Delete the port's UDP conntrack entries once the move is complete, so every UDP
        flow takes the new path. Not earlier: a reply the old listener sends while it is
        still open would create a fresh untranslated entry, and the client's flow would
        keep arriving at a closed port."""
        udp = [m for m in mappings if m.proto == "udp"]
        if udp:
            try:
                await self._in_worker(KernelPath.forget_udp_flows, udp, translated)
            except Exception as exc:  # noqa: BLE001 - flows then move when their entries time out
                log.warning("deleting UDP conntrack entries failed: %s", exc)

    async def _realise(self, m: Mapping, entry: Entry, sockets: dict[int, socket.socket] | None = None) -> bool:
        """Try to run a mapping that is not running; record the outcome. True if it runs."""
        try:
            self.check_settings(m, entry.settings)
            await self._move(m, entry, set(), components(entry.mode), sockets)
        except PortproxyError as exc:
            installed = [p for p in m.per_family() if self._kernel is not None and p in self._kernel.ids]
            if installed:  # put in by the start's batch
                try:
                    await self._kernel_apply(entry, remove=installed)
                except PortproxyError as undo_exc:
                    log.error("removing the DNAT of %s failed: %s", m, undo_exc)
            self._mark_failed(m, entry, str(exc))
            await self._release_routing()
            return False
        if entry.status == "failed":
            log.info("%s runs now (%s), after %d failed attempt(s)", m, entry.mode, entry.failures)
        entry.status, entry.error, entry.failures = "running", None, 0
        return True

    def _mark_failed(self, m: Mapping, entry: Entry, reason: str) -> None:
        if entry.error != reason:
            log.error("%s cannot run: %s (retrying with back-off)", m, reason)
        entry.status, entry.error = "failed", reason
        entry.failures += 1
        entry.retry_at = self.loop.time() + min(RETRY_MAX, RETRY_FIRST * 2 ** (entry.failures - 1))

    # --- persistence ----------------------------------------------------------------------
    def _persist(self) -> None:
        if self.store is not None:
            self.store.save([SavedEntry(m, e.settings, e.source, e.owner, e.kernel_id)
                             for m, e in self.entries.items() if e.source in PERSISTED_SOURCES])

    async def _commit(self, change: Callable[[], None], undo: Callable[[], Any]) -> None:
        """Record a change in the entries and on disk; if the disk refuses, undo it all."""
        change()
        try:
            self._persist()
        except OSError as exc:
            await undo()
            raise SystemFailure(f"cannot save state: {exc.strerror}") from None
        await self._expect_departures()
        self._changed()

    async def _expect_departures(self, consumed: Iterable[int] = (), force: bool = False) -> None:
        """Keep the table where a DEL made while this daemon is away is recorded
        (:mod:`portproxy.cni.departures`) from its first CNI mapping on; at the start, and
        at the stop (:meth:`stop`), remove it if the daemon holds none. Not on every last
        mapping's removal: one container coming and going would create and delete it on
        each ``podman run``."""
        expect = any(e.source == "cni" for e in self.entries.values())
        if force or consumed or (expect and not self._departures_expected):
            await self._in_worker(cni_adopt.settle_departures, consumed, expect)
            self._departures_expected = expect

    def _changed(self) -> None:
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
            raise NotFound(f"no mapping {wanted}")
        port_text, _, proto = name.strip().partition("/")
        if not port_text.isdigit() or len(port_text) > 5 or proto not in ("", "tcp", "udp"):
            raise BadInput(f"{shorten(name)} is neither a mapping spec nor HOST_PORT[/PROTO]")
        port = int(port_text)
        found = [m for m in self.entries if m.host_port <= port <= m.host_port_end and (not proto or m.proto == proto)]
        if not found:
            raise NotFound(f"no mapping on port {name}")
        if len(found) > 1:
            raise Conflict(f"port {name} is ambiguous: {', '.join(str(m) for m in found)}")
        return found[0]

    def _near(self, mapping: Mapping) -> list[Mapping]:
        """The mappings whose ports meet ``mapping``'s: the pairwise overlap check of all of
        them made every add O(n²) (~90 ms at 1,000 Docker ports)."""
        return [m for m in self.entries if m.proto == mapping.proto and m.host_port <= mapping.host_port_end
                and mapping.host_port <= m.host_port_end]

    async def add(self, spec: str | Mapping, settings: Settings | None = None, source: str = "api",
                  owner: dict[str, str] | None = None, sockets: dict[int, socket.socket] | None = None) -> Mapping:
        """Add and start a mapping; refused (nothing kept) when it cannot start now."""
        mapping = spec if isinstance(spec, Mapping) else parse_spec(spec)
        settings = settings or Settings()
        owner = validate_owner(owner)
        async with self._lock:
            if mapping in self.entries:
                raise Conflict(f"mapping {mapping} exists already")
            try:
                check_no_overlap([*self._near(mapping), mapping])
            except SpecError as exc:
                raise Conflict(str(exc)) from None
            entry = Entry(settings, source, owner)
            if source == "cni" and entry.mode != "kernel":
                raise BadInput(f"mapping {mapping}: a CNI runtime's mappings are kernel-path only (mode kernel): "
                               "the runtime holds their host ports itself")
            self.check_settings(mapping, settings)
            self._warn_if_not_local(mapping)
            await self._move(mapping, entry, set(), components(entry.mode), sockets)
            entry.status = "running"

            def change() -> None:
                self.entries[mapping] = entry

            async def undo() -> None:
                self.entries.pop(mapping, None)
                await self._move(mapping, entry, components(entry.mode), set())

            await self._commit(change, undo)
            log.info("added %s (%s%s)", mapping, entry.mode, f", {owner['kind']} {owner['id'][:12]}" if owner else "")
            return mapping

    async def remove(self, name: str) -> Mapping:
        async with self._lock:
            mapping = self.resolve(name)
            await self._remove(mapping)
            return mapping

    async def remove_owned(self, owner_id: str) -> list[Mapping]:
        """Remove every mapping of one owner (a container); none is fine (DEL is idempotent)."""
        async with self._lock:
            owned = [m for m, e in self.entries.items() if e.owner and e.owner.get("id") == owner_id]
            for mapping in owned:
                await self._remove(mapping)
            return owned

    async def declare_owned(self, owner: Any, wanted: list[tuple[Mapping, Settings]]) -> dict[str, list[str]]:
        """Make the mappings of one owner exactly ``wanted`` (a CNI ADD, or DEL with none).

        All or nothing, in one kernel transaction and one state write: what is kept is
        not touched (its DNAT, kernel id and counters stay), the rest of the owner's go
        out and the new ones in through a single :meth:`KernelPath.apply`. Everything is
        checked first (owner, modes, options, overlaps within ``wanted`` and with every
        other mapping), so a refusal changes nothing, and a failed nft batch or state
        write leaves the kernel and the state as they were.

        Scope: kernel mappings of a CNI owner only. A CNI runtime holds its containers'
        host ports itself, so there is no port to hold and no listener to open, and
        nothing can fail half-way outside the one kernel transaction; userland and
        hybrid mappings (and Docker's, which hold their ports) are added one by one with
        :meth:`add`."""
        owner = validate_owner(owner)
        if owner is None or source_of(owner) != "cni":
            raise BadInput("owner must be an object with kind cni and id: a declared set is a CNI attachment's "
                           "(add other mappings one by one with POST /v1/mappings)")
        for mapping, settings in wanted:
            if settings.mode != "kernel":
                raise BadInput(f"mapping {mapping}: mode {settings.mode}: a declared set takes kernel mappings "
                               "only (the runtime holds the ports); add userland or hybrid mappings one by one "
                               "with POST /v1/mappings")
            self.check_settings(mapping, settings)
        try:
            check_no_overlap([m for m, _ in wanted])
        except SpecError as exc:
            raise BadInput(f"the request's {exc}") from None
        async with self._lock:
            mine = {m: e for m, e in self.entries.items() if same_owner(e.owner, owner)}
            installed = self._kernel.ids if self._kernel is not None else {}
            plan = plan_owned({m: e.settings for m, e in mine.items()}, dict(wanted), installed, self.options.kernel)
            try:
                check_no_overlap([*(m for m in self.entries if m not in mine), *plan.add])
            except SpecError as exc:
                raise Conflict(str(exc)) from None
            for mapping in plan.add:
                self._warn_if_not_local(mapping)
            adding = set(plan.add)
            added = {m: Entry(settings, "cni", owner, "running", kernel_id=mine[m].kernel_id if m in mine else None)
                     for m, settings in wanted if m in adding}
            old_ids = dict(installed)
            preferred = {p: e.kernel_id for m, e in added.items() if e.kernel_id for p in m.per_family()}
            # hairpin is the CNI bridge plugin's (hairpinMode), as with portmap
            kernel = await self._kernel_batch(plan.kernel_add, plan.kernel_remove, preferred, set_hairpin=False)
            for m, entry in added.items():
                if kernel is not None:
                    _note_kernel_id(entry, m.per_family(), kernel)
            old_owners = {m: mine[m].owner for m in plan.keep}

            def change() -> None:
                for m in plan.remove:
                    del self.entries[m]
                self.entries.update(added)
                for m in plan.keep:
                    self.entries[m].owner = owner

            async def undo() -> None:
                for m in plan.add:
                    self.entries.pop(m, None)
                self.entries.update({m: mine[m] for m in plan.remove})
                for m, old in old_owners.items():
                    self.entries[m].owner = old
                await self._kernel_batch(plan.kernel_remove, plan.kernel_add, old_ids, set_hairpin=False)

            if plan.add or plan.remove or any(old != owner for old in old_owners.values()):
                await self._commit(change, undo)
            for m in plan.remove:
                if m not in added:
                    for part in m.per_family():
                        self.proxy.forget_stats(part)  # its series disappear
            await self._forget_udp_flows(plan.kernel_add, translated=True)
            await self._forget_udp_flows(plan.kernel_remove, translated=False)
            log.info("owner %s %s: +%d -%d (=%d)", owner["kind"], owner["id"][:12], len(plan.add),
                     len(plan.remove), len(plan.keep))
            return {"added": [str(m) for m in plan.add], "removed": [str(m) for m in plan.remove],
                    "kept": [str(m) for m in plan.keep]}

    async def _remove(self, mapping: Mapping) -> None:
        entry = self.entries[mapping]
        running = components(entry.mode) if entry.status == "running" else set()
        await self._move(mapping, entry, running, set())
        await self._commit(lambda: self.entries.pop(mapping), lambda: self._move(mapping, entry, set(), running))
        for part in mapping.per_family():
            self.proxy.forget_stats(part)  # its series disappear
        await self._release_routing()
        log.info("removed %s", mapping)

    async def switch(self, name: str, mode: str) -> Mapping:
        new_mode = schema.check("mode", mode, "mode")
        async with self._lock:
            mapping = self.resolve(name)
            entry = self.entries[mapping]
            old_settings = entry.settings
            if old_settings.mode == new_mode:
                return mapping
            new_settings = dataclasses.replace(old_settings, mode=new_mode)
            self.check_settings(mapping, new_settings)
            if entry.status == "running":
                await self._move(mapping, entry, components(old_settings.mode), components(new_mode))

            def change() -> None:
                entry.settings = new_settings

            async def undo() -> None:
                entry.settings = old_settings
                if entry.status == "running":
                    await self._move(mapping, entry, components(new_mode), components(old_settings.mode))

            await self._commit(change, undo)
            await self._release_routing()
            if entry.status == "failed":
                entry.retry_at = 0.0  # a failed mapping tries its new mode at once
            log.info("switched %s: %s -> %s", mapping, old_settings.mode, new_mode)
            return mapping

    async def reload(self, config: Config) -> dict[str, list[str]]:
        """Apply the difference between the running config mappings and ``config``.

        A mapping that cannot start is kept as failed (and retried), and reported."""
        report: dict[str, list[str]] = {"added": [], "removed": [], "switched": [], "errors": []}
        changed = [k for k, v in dict(config.options.values).items() if dict(self.options.values).get(k) != v]
        changed += [k for k in dict(self.options.values) if k not in dict(config.options.values)]
        if changed:
            report["restart_required"] = sorted(set(changed))
            log.warning("reload: [options] %s changed; they take effect at the next restart",
                        ", ".join(sorted(set(changed))))
        current = {m: e for m, e in self.entries.items() if e.source == "config"}
        for mapping in [m for m in current if m not in config.mappings]:
            await self._record(report, "removed", mapping, self.remove(str(mapping)))
        for mapping, settings in config.mappings.items():
            entry = self.entries.get(mapping)
            if entry is not None and entry.source != "config":
                report["errors"].append(f"{mapping}: exists already as a mapping of the {entry.source} "
                                        "(remove it there first); left as it is")
                continue
            if entry is None:
                await self._record(report, "added", mapping, self._add_desired(mapping, settings))
            elif entry.settings.overrides != settings.overrides:
                await self._record(report, "switched", mapping, self._replace(mapping, settings))
            elif entry.mode != settings.mode:
                await self._record(report, "switched", mapping, self.switch(str(mapping), settings.mode))
        return report

    async def _add_desired(self, mapping: Mapping, settings: Settings) -> None:
        """Add a config mapping: kept (as failed, retried) even when it cannot start now."""
        async with self._lock:
            try:
                check_no_overlap([*self._near(mapping), mapping])
            except SpecError as exc:
                raise Conflict(str(exc)) from None
            self.check_settings(mapping, settings)
            entry = Entry(settings, "config")
            self.entries[mapping] = entry
            ok = await self._realise(mapping, entry)
            self._changed()
            if not ok:
                raise SystemFailure(entry.error or "cannot start")

    async def _replace(self, mapping: Mapping, settings: Settings) -> None:
        """New per-mapping options: the mapping restarts with them (connections run on)."""
        await self.remove(str(mapping))
        await self._add_desired(mapping, settings)

    @staticmethod
    async def _record(report: dict[str, list[str]], what: str, mapping: Mapping, op: Any) -> None:
        try:
            await op
            report[what].append(str(mapping))
        except PortproxyError as exc:
            report["errors"].append(f"{mapping}: {exc}")
            log.error("reload: %s: %s", mapping, exc)

    # --- start and stop ---------------------------------------------------------------------------
    async def start(self, config: Config) -> list[str]:
        """Reconcile: config mappings plus API (and CNI) mappings from the saved state.

        Kernel mappings go in as one atomic batch that also replaces whatever a crashed
        run left in the table (with the ids they had, so live flows keep their counters);
        then the listeners. A mapping that cannot start is kept as failed, reported (one
        line each), and retried; the others start. Nothing in the state is ever dropped.
        """
        async with self._lock:  # the API already answers: an add waits until the start is over
            return await self._start(config)

    async def _start(self, config: Config) -> list[str]:
        saved = self.store.load() if self.store is not None else []
        desired: dict[Mapping, Entry] = {}
        for item in saved:
            if item.source in PERSISTED_SOURCES:
                desired[item.mapping] = Entry(item.settings, item.source, item.owner, kernel_id=item.kernel_id)
        for mapping, settings in config.mappings.items():
            saved_id = next((s.kernel_id for s in saved if s.mapping == mapping), None)
            desired[mapping] = Entry(settings, "config", kernel_id=saved_id)
        try:
            check_no_overlap(list(desired))
        except SpecError as exc:
            raise Conflict(f"saved and configured mappings conflict: {exc}") from None
        try:  # its lock first: a plugin then leaves the table alone until this start is over
            await self._kernel_path()
        except PortproxyError:
            pass  # reported by _install_kernel_table, which needs it
        departed = await self._in_worker(cni_adopt.read_departures)
        cni_adopt.drop_departed(desired, set(departed.values()))
        adopted = cni_adopt.merge(await self._in_worker(cni_adopt.read_all), desired,
                                  lambda owner: Entry(Settings("kernel"), "cni", owner))
        self.entries = desired
        await self._install_kernel_table()
        for mapping, entry in desired.items():
            await self._realise(mapping, entry)
        await self._in_worker(cni_adopt.forget_running, adopted)  # after ours are in: no gap
        self._persist()
        await self._expect_departures(consumed=departed, force=True)
        self._tasks = [self.loop.create_task(self._retry_loop()), self.loop.create_task(self._reconcile_loop())]
        return [f"{m}: {e.error}" for m, e in desired.items() if e.status == "failed"]

    async def _install_kernel_table(self) -> None:
        """One batch for every kernel mapping at start (replacing a crashed run's table).
        Mappings that batch cannot take are then tried one by one by ``_realise``."""
        wanted = [p for m, e in self.entries.items() if e.mode != "userland" for p in m.per_family()
                  if not why_not_translated(p, self.options.kernel)]
        owners = {p: e for m, e in self.entries.items() for p in m.per_family()}
        try:
            kernel = await self._kernel_path()
        except PortproxyError as exc:
            if wanted:
                log.error("the kernel path is unavailable: %s", exc)
            return
        if not wanted:
            if await self._in_worker(kernel.table_present):
                await self._in_worker(kernel.teardown)  # left over from a previous run
            return
        preferred = {p: owners[p].kernel_id for p in wanted if owners[p].kernel_id}
        ok = wanted

        def install() -> None:
            kernel.apply(ok, replace=True, set_sysctls=self.options.set_sysctls,
                         preferred_ids=preferred)  # type: ignore[arg-type]
            kernel.forget_udp_flows(ok, translated=True)

        try:
            await self._in_worker(install)
        except PortproxyError as exc:
            log.warning("installing the kernel mappings in one batch failed (%s); trying them one by one", exc)
            return
        # DNAT is in; _realise then only holds the ports and opens listeners. A mapping whose
        # ports cannot be held has its DNAT taken out again there.
        for p in ok:
            owners[p].kernel_id = kernel.ids.get(p)

    async def stop(self, keep_kernel_rules: bool | None = None) -> None:
        """Drain userland connections; remove the kernel table unless told to keep it."""
        for task in self._tasks:
            task.cancel()
        keep = self.options.keep_kernel_rules if keep_kernel_rules is None else keep_kernel_rules
        await self.proxy.stop()
        if self._departures_expected and not any(e.source == "cni" for e in self.entries.values()):
            await self._expect_departures(force=True)  # no CNI mapping to keep word for
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
        if self._kernel is not None:
            self._kernel.close()
        if self._routing is not None:
            try:
                await self._in_worker(self._routing.release)
            except PortproxyError as exc:
                log.error("removing transparent mode's routing failed: %s", exc)
            self._routing = None
        self._worker.shutdown(wait=True)

    # --- keeping reality as desired -------------------------------------------------------------
    async def _retry_loop(self) -> None:
        while True:
            await asyncio.sleep(RETRY_FIRST / 2)
            now = self.loop.time()
            due = [(m, e) for m, e in self.entries.items() if e.status == "failed" and e.retry_at <= now]
            for mapping, entry in due:
                async with self._lock:
                    if self.entries.get(mapping) is entry and entry.status == "failed":
                        if await self._realise(mapping, entry):
                            self._persist_quietly()
                            self._changed()

    async def _reconcile_loop(self) -> None:
        """The quick check every few seconds; the deep one (rule counts) as often as its
        cost allows: at most ~5 % of the worker's time."""
        next_deep = 0.0
        while True:
            await asyncio.sleep(RECONCILE_INTERVAL)
            deep = self.loop.time() >= next_deep
            started = self.loop.time()
            try:
                await self.reconcile(deep)
            except Exception as exc:  # noqa: BLE001 - the loop must survive a bad moment
                log.error("checking the nft table failed: %s", exc)
            if deep:
                next_deep = self.loop.time() + max(RECONCILE_INTERVAL, 20 * (self.loop.time() - started))

    async def reconcile(self, deep: bool = True) -> None:
        """Reinstall the nft table, and transparent mode's routing, if someone deleted or
        altered them (one line each, counted)."""
        await self._reconcile_routing()
        kernel = self._kernel
        if kernel is None or not kernel.ids:
            return
        # Read outside the lock and off the worker: a deep check of a large table takes
        # seconds, and ls, add or switch must not wait for it.
        problem = await asyncio.to_thread(kernel.health, deep)
        self.kernel_problem = problem
        if problem is None:
            return
        async with self._lock:
            problem = await self._in_worker(kernel.health, deep)
            if problem is None:
                self.kernel_problem = None
                return
            mappings = list(kernel.ids)

            def reinstall() -> None:
                kernel.apply(mappings, replace=True, set_sysctls=self.options.set_sysctls,
                             preferred_ids=dict(kernel.ids))

            try:
                await self._in_worker(reinstall)
            except PortproxyError as exc:
                log.error("%s; reinstalling it failed: %s", problem, exc)
                return
            self.reconciles += 1
            self.kernel_problem = None
            log.warning("%s; reinstalled it with %d mapping(s)", problem, len(mappings))

    async def _reconcile_routing(self) -> None:
        routing = self._routing
        if routing is None or await asyncio.to_thread(routing.present):
            return
        async with self._lock:
            if self._routing is not routing:
                return
            try:
                await self._in_worker(routing.install)
            except PortproxyError as exc:
                log.error("transparent mode's routing was removed; reinstalling it failed: %s", exc)
                return
            self.reconciles += 1
            log.warning("transparent mode's routing (ip rule, table %d or marking rule) was removed; reinstalled it",
                        routing.opts.table)

    def _persist_quietly(self) -> None:
        try:
            self._persist()
        except OSError as exc:
            log.error("cannot save state: %s", exc.strerror)

    def _warn_if_not_local(self, mapping: Mapping) -> None:
        """A host address that is not on this host still binds (IP_FREEBIND, as docker-proxy
        does), but nothing reaches it until it is configured: say so."""
        ip = mapping.host_ip
        if ip is None or ip.is_unspecified:
            return
        probe = socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.bind((str(ip), 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                log.warning("%s: %s is not an address of this host (yet); nothing reaches it until it is",
                            mapping, ip)
        finally:
            probe.close()

    # --- reading ------------------------------------------------------------------------------------
    def daemon_counters(self) -> dict[str, int]:
        """Counters of the daemon itself, for the metrics thread."""
        repairs = self._kernel.repairs if self._kernel is not None else 0
        return {"kernel_reconciles": self.reconciles + repairs}

    def metrics_snapshot(self) -> list["MappingSnapshot"]:
        """Called on the metrics thread: copies first (the loop thread may be changing things)."""
        from ..metrics.snapshot import KernelCounterReader, mapping_snapshot

        entries = [(m, e.mode, e.status) for m, e in list(self.entries.items())]
        stats = dict(self.proxy.stats)
        kernel_counters = {}
        if self._kernel is not None:
            if self._metrics_reader is None:
                self._metrics_reader = KernelCounterReader(self.options.kernel)
            kernel_counters = self._metrics_reader.read(dict(self._kernel.ids))
        return [mapping_snapshot(m, mode, stats, kernel_counters, failed=status == "failed")
                for m, mode, status in entries]

    async def describe(self) -> list[dict[str, Any]]:
        """Every mapping as it is, kernel side read from the kernel (a deleted table shows)."""
        counters = {}
        if self._kernel is not None and self._kernel.ids:
            try:
                self.kernel_problem = await self._in_worker(self._kernel.health, False)
                if self.kernel_problem is None:
                    counters = await self._in_worker(self._kernel.counters)
            except NftError as exc:
                log.warning("reading kernel counters failed: %s", exc)
        result = []
        for mapping, entry in sorted(self.entries.items(), key=lambda item: item[0].sort_key()):
            item: dict[str, Any] = {"spec": str(mapping), "mode": entry.mode, "source": entry.source,
                                    "status": entry.status}
            if entry.error:
                item["error"] = entry.error
            if entry.owner:
                item["owner"] = entry.owner
            if entry.settings.overrides:
                item["options"] = dict(entry.settings.overrides)
            parts = mapping.per_family()
            userland = [s for p in parts for s in self.proxy.stats.get(p, [])]
            tcp = [s for s in userland if isinstance(s, TcpStats)]
            udp = [s for s in userland if isinstance(s, UdpStats)]
            item["userland"] = {
                "listening": [p.listen_label() for p in parts if self.proxy.serving(p)],
                "connections": sum(s.active for s in tcp),
                "accepted": sum(s.accepted for s in tcp),
                "bytes_to_target": sum(s.bytes[TO_TARGET] for s in tcp) + sum(s.bytes_to_target for s in udp),
                "bytes_to_client": sum(s.bytes[TO_CLIENT] for s in tcp) + sum(s.bytes_to_client for s in udp),
                "udp_flows": sum(s.flows_active for s in udp),
            }
            item["families"] = {f"ipv{p.listen_ip().version}": _served_by(self._part_components(p, components(entry.mode)))
                                for p in parts}
            translated = [p for p in parts if not why_not_translated(p, self.options.kernel)]
            if KERNEL in components(entry.mode) and entry.status == "running" and translated:
                kernel = counters.get(translated[0])
                if kernel is not None:
                    item["kernel"] = {**dataclasses.asdict(kernel), "packets": kernel.packets,
                                      "bytes": kernel.bytes}
                else:
                    item["kernel"] = None
                    item["kernel_problem"] = self.kernel_problem or "not in the nft table"
            result.append(item)
        return result


def _note_kernel_id(entry: Entry, parts: Sequence[Mapping], kernel: KernelPath) -> None:
    """Record the id the nft table gave the mapping (kept across restarts)."""
    for m in parts:
        entry.kernel_id = kernel.ids.get(m, entry.kernel_id)


def _served_by(parts: set[str]) -> str:
    return "hybrid" if parts == {LISTENER, KERNEL} else "kernel" if parts == {KERNEL} else "userland"


__all__ = ["Config", "Controller", "Entry", "components"]
