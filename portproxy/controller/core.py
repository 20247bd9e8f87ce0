"""The controller: the desired mappings, and every change to them as plan → execute → commit.

What a change means is planned in :mod:`.plan` (pure: ordered steps, make before break);
:class:`~.realiser.Realiser` runs the steps on the proxy and the nft table with one undo
stack; the plan's :class:`~.plan.Commit` step is where the new desired state is recorded
here and saved (for the mappings that are saved: the API's and CNI's). A change the disk
refuses is undone whole: the mapping stays exactly as it was — listed, served, removable,
saved — and nothing that is not saved (the config's mappings, Docker's) ever writes the
state file. One lock serialises every change.

**Desired state is never destroyed by a failure to realise it.** What the operator
asked for (config, API, saved state) is kept in :attr:`Controller.entries`; a mapping
that cannot run (port held by another program, a sysctl off after a reboot) stays
there with status ``failed`` and its reason, is saved, shown, counted, and retried with
back-off until it runs or is removed (:mod:`.upkeep`, which also reinstalls the nft
table and retries a failed save of the state). What is shown is in :mod:`.readmodel`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import socket
from typing import TYPE_CHECKING, Any, Callable, Iterable

from .. import schema
from ..errors import BadInput, Conflict, PortproxyError, SystemFailure
from ..spec import Mapping, SpecError, check_no_overlap, parse_spec
from . import adopt, plan, readmodel
from .auto import AutoPolicy
from .config import Config, DaemonOptions, Settings
from .entry import Entry, check_declared, check_settings, resolve, same_owner, validate_owner
from .realiser import Realiser
from .state import SavedEntry, StateStore
from .upkeep import RETRY_FIRST, RETRY_MAX, Upkeep

if TYPE_CHECKING:
    from ..metrics.snapshot import MappingSnapshot

log = logging.getLogger("portproxy.controller")


class Controller:
    def __init__(self, loop: asyncio.AbstractEventLoop, options: DaemonOptions, store: StateStore | None) -> None:
        self.loop = loop
        self.options = options
        self.store = store
        self.realiser = Realiser(loop, options)
        self.entries: dict[Mapping, Entry] = {}
        self.lock = asyncio.Lock()
        self.upkeep = Upkeep(self)
        self.save_error: str | None = None
        """Why the last save of the state failed while the daemon serves on (None: saved)."""
        self.save_failures = 0
        """Saves of the state the disk refused (counted for the metrics)."""
        self._departures_expected = False
        """Whether the DEL-while-away table is kept (from this daemon's first CNI mapping on)."""
        self.on_change: Callable[[], None] | None = None
        """Called after every committed change (the daemon updates systemd's STATUS=)."""
        self.metrics_reader: Any = None
        """The metrics thread's own reader of the kernel counters (created on its first scrape)."""

    # --- what a mapping asks of the paths -----------------------------------------------------
    def check_settings(self, mapping: Mapping, settings: Settings) -> None:
        check_settings(mapping, settings, self.options.proxy)

    def _check_free(self, mapping: Mapping, others: Iterable[Mapping] | None = None) -> None:
        """Conflict unless ``mapping``'s ports meet none of the others' (by default: the mappings
        near it, so an add costs the same whatever the number of mappings)."""
        if others is None:
            others = [m for m in self.entries if m.proto == mapping.proto and m.host_port <= mapping.host_port_end
                      and mapping.host_port <= m.host_port_end]
        try:
            check_no_overlap([*others, mapping])
        except SpecError as exc:
            raise Conflict(str(exc)) from None

    # --- persistence ---------------------------------------------------------------------------
    def _save(self, entries: dict[Mapping, Entry]) -> None:
        """Write the saved mappings of ``entries``; SystemFailure (one line) when the disk refuses."""
        if self.store is None:
            return
        try:
            self.store.save([SavedEntry(m, e.settings, e.origin, e.owner, e.kernel_id)
                             for m, e in entries.items() if e.persisted])
        except OSError as exc:
            self.save_failures += 1
            raise SystemFailure(f"cannot save state: {exc.strerror or exc}") from None
        if self.save_error is not None:
            log.info("saved the state again")
            self.save_error = None

    def save_quietly(self) -> bool:
        """Save what the daemon runs; when the disk refuses, serve on, report it (``save_error``,
        the metrics, one log line) and let the upkeep retry."""
        try:
            self._save(self.entries)
        except SystemFailure as exc:
            if self.save_error != str(exc):
                log.error("%s; serving on and retrying", exc)
            self.save_error = str(exc)
            return False
        return True

    def _commit(self, changes: dict[Mapping, Entry | None]) -> None:
        """Record ``changes`` (None: removed) in the desired state, saved first when a saved
        mapping changes: a refused save leaves the desired state exactly as it was."""
        if any(_record(m, self.entries.get(m)) != _record(m, e) for m, e in changes.items()):
            new = dict(self.entries)
            _apply(new, changes)
            self._save(new)
        _apply(self.entries, changes)

    async def _run(self, steps: list[plan.Step], changes: Callable[[], dict[Mapping, Entry | None]],
                   sockets: dict[int, socket.socket] | None = None) -> None:
        """Plan → execute → commit: run ``steps``; at their Commit, record ``changes()``; if a
        later step fails, put the old entries back (and save them)."""
        before: dict[Mapping, Entry | None] = {}

        def commit() -> None:
            wanted = changes()
            before.update({m: self.entries.get(m) for m in wanted})
            self._commit(wanted)

        def uncommit() -> None:
            _apply(self.entries, before)
            self.save_quietly()

        try:
            await self.realiser.run(steps, sockets=sockets, commit=commit, uncommit=uncommit)
        finally:
            await self._release_routing_if_unused()
        await self._expect_departures()
        self._changed()

    async def _release_routing_if_unused(self) -> None:
        if self.realiser.routing is not None and not any(
                e.running and plan.is_transparent(e.settings, self.options.proxy) for e in self.entries.values()):
            await self.realiser.release_routing()

    async def _expect_departures(self, consumed: Iterable[int] = (), force: bool = False) -> None:
        """Keep the table where a DEL made while this daemon is away is recorded
        (:mod:`portproxy.cni.departures`) from its first CNI mapping on; at the start, and
        at the stop (:meth:`stop`), remove it if the daemon holds none. Not on every last
        mapping's removal: one container coming and going would create and delete it on
        each ``podman run``."""
        expect = any(e.origin == "cni" for e in self.entries.values())
        if force or consumed or (expect and not self._departures_expected):
            await self.realiser.in_worker(adopt.settle_departures, consumed, expect)
            self._departures_expected = expect

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # --- running one desired mapping ------------------------------------------------------------
    async def realise(self, m: Mapping, entry: Entry, dnat_present: bool = False) -> bool:
        """Try to run a desired mapping that does not run; record the outcome. True if it runs."""
        try:
            self.check_settings(m, entry.settings)
            await self.realiser.run(plan.realise(m, entry.path, entry.target(self.options.proxy),
                                                 self.options.kernel, dnat_present))
        except PortproxyError as exc:
            self._mark_failed(m, entry, str(exc))
            await self._release_routing_if_unused()
            return False
        entry.kernel_id = self.realiser.kernel_id(m, entry.kernel_id)
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

    # --- operations -------------------------------------------------------------------------------
    def resolve(self, name: str) -> Mapping:
        return resolve(self.entries, name)

    async def add(self, spec: str | Mapping, settings: Settings | None = None, origin: str = "api",
                  owner: dict[str, str] | None = None, sockets: dict[int, socket.socket] | None = None) -> Mapping:
        """Add and start a mapping; refused (nothing kept) when it cannot start now."""
        mapping = spec if isinstance(spec, Mapping) else parse_spec(spec)
        settings = settings or Settings()
        owner = validate_owner(owner)
        async with self.lock:
            if mapping in self.entries:
                raise Conflict(f"mapping {mapping} exists already")
            self._check_free(mapping)
            entry = Entry(settings, origin, owner, "running")
            if origin == "cni" and entry.mode != "kernel":
                raise BadInput(f"mapping {mapping}: a CNI runtime's mappings are kernel-path only (mode kernel): "
                               "the runtime holds their host ports itself")
            self.check_settings(mapping, settings)
            _warn_if_not_local(mapping)

            def changes() -> dict[Mapping, Entry | None]:
                entry.kernel_id = self.realiser.kernel_id(mapping, entry.kernel_id)
                return {mapping: entry}

            self._give_policy(entry)
            await self._run(plan.add(mapping, entry.path, entry.target(self.options.proxy), self.options.kernel),
                            changes, sockets)
            log.info("added %s (%s%s)", mapping, entry.mode, f", {owner['kind']} {owner['id'][:12]}" if owner else "")
            return mapping

    async def remove(self, name: str) -> Mapping:
        async with self.lock:
            mapping = self.resolve(name)
            await self._remove(mapping)
            return mapping

    async def remove_owned(self, owner_id: str) -> list[Mapping]:
        """Remove every mapping of one owner (a container); none is fine (DEL is idempotent)."""
        async with self.lock:
            owned = [m for m, e in self.entries.items() if e.owner and e.owner.get("id") == owner_id]
            for mapping in owned:
                await self._remove(mapping)
            return owned

    async def _remove(self, mapping: Mapping) -> None:
        entry = self.entries[mapping]
        steps = plan.remove(mapping, entry.path, entry.running, entry.target(self.options.proxy), self.options.kernel)
        await self._run(steps, lambda: {mapping: None})
        log.info("removed %s", mapping)

    async def switch(self, name: str, mode: str) -> Mapping:
        new_mode = schema.check("mode", mode, "mode")
        async with self.lock:
            mapping = self.resolve(name)
            entry = self.entries[mapping]
            if entry.mode == new_mode:
                return mapping
            new_settings = dataclasses.replace(entry.settings, mode=new_mode)
            self.check_settings(mapping, new_settings)
            switched = dataclasses.replace(entry, settings=new_settings, auto=None)
            # An auto mapping starts where the mapping is: hot if its DNAT is in already.
            self._give_policy(switched, plan.HOT if plan.KERNEL in plan.components(entry.path) else plan.COOL)
            if not entry.running:
                switched.retry_at = 0.0  # a failed mapping tries its new mode at once

            def changes() -> dict[Mapping, Entry | None]:
                switched.kernel_id = self.realiser.kernel_id(mapping, entry.kernel_id)
                return {mapping: switched}

            steps = plan.switch(mapping, entry.path, switched.path, entry.running,
                                entry.target(self.options.proxy, new_settings), self.options.kernel)
            await self._run(steps, changes)
            log.info("switched %s: %s -> %s", mapping, entry.mode, new_mode)
            return mapping

    def _give_policy(self, entry: Entry, place: str = plan.COOL) -> None:
        """An auto mapping's policy, with the daemon's thresholds, starting at ``place``."""
        if entry.settings.mode == "auto" and entry.auto is None:
            entry.auto = AutoPolicy(schema.auto_thresholds(dict(self.options.values)), place)  # type: ignore[arg-type]

    def auto_entries(self) -> list[tuple[Mapping, Entry]]:
        """The running auto mappings (for the autopilot)."""
        return [(m, e) for m, e in self.entries.items() if e.auto is not None and e.running]

    async def auto_move(self, mapping: Mapping, entry: Entry, place: str) -> None:
        """Move a running auto mapping to ``place``: the live switch, make before break.
        Not saved (an auto mapping's place is not desired state: it starts light)."""
        async with self.lock:
            if self.entries.get(mapping) is not entry or entry.auto is None or not entry.running:
                return  # removed, switched or failed meanwhile
            old = entry.path
            steps = plan.switch(mapping, old, place, True, entry.target(self.options.proxy), self.options.kernel)
            await self._run(steps, lambda: {})
            entry.auto.moved(place)  # type: ignore[arg-type]
            entry.kernel_id = self.realiser.kernel_id(mapping, entry.kernel_id)
            load = entry.auto.load
            log.info("auto: moved %s from %s to %s (%.0f bytes/s, %.1f connections/s)", mapping, old, place,
                     load.bytes_per_second if load else 0, load.connections_per_second if load else 0)

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
        owner = check_declared(owner, wanted, self.options.proxy)
        async with self.lock:
            mine = {m: e for m, e in self.entries.items() if same_owner(e.owner, owner)}
            owned = plan.declare({m: e.settings for m, e in mine.items()}, dict(wanted), self.realiser.kernel_ids(),
                                 self.options.kernel, {m: e.kernel_id for m, e in mine.items() if e.kernel_id})
            if owned.add:
                others = [m for m in self.entries if m not in mine]
                try:
                    check_no_overlap([*others, *owned.add])
                except SpecError as exc:
                    raise Conflict(str(exc)) from None
            for mapping in owned.add:
                _warn_if_not_local(mapping)
            adding = set(owned.add)
            added = {m: Entry(settings, "cni", owner, "running", kernel_id=mine[m].kernel_id if m in mine else None)
                     for m, settings in wanted if m in adding}

            def changes() -> dict[Mapping, Entry | None]:
                result: dict[Mapping, Entry | None] = {m: None for m in owned.remove}
                for m, entry in added.items():
                    entry.kernel_id = self.realiser.kernel_id(m, entry.kernel_id)
                    result[m] = entry
                result.update({m: dataclasses.replace(mine[m], owner=owner) for m in owned.keep
                               if mine[m].owner != owner})
                return result

            await self._run(owned.steps, changes)
            log.info("owner %s %s: +%d -%d (=%d)", owner["kind"], owner["id"][:12], len(owned.add),
                     len(owned.remove), len(owned.keep))
            return {"added": [str(m) for m in owned.add], "removed": [str(m) for m in owned.remove],
                    "kept": [str(m) for m in owned.keep]}

    async def reload(self, config: Config) -> dict[str, list[str]]:
        """Apply the difference between the running config mappings and ``config``.

        A mapping that cannot start is kept as failed (and retried), and reported."""
        report: dict[str, list[str]] = {"added": [], "removed": [], "switched": [], "errors": []}
        changed = plan.options_changed(self.options.values, config.options.values)
        if changed:
            report["restart_required"] = changed
            log.warning("reload: [options] %s changed; they take effect at the next restart", ", ".join(changed))
        ops = plan.reload_diff({m: (e.settings, e.origin) for m, e in self.entries.items()}, config)
        for op in ops:
            settings = op.settings or Settings()
            if op.kind == "refuse":
                report["errors"].append(f"{op.mapping}: {op.reason}")
            elif op.kind == "remove":
                await _record_op(report, "removed", op.mapping, self.remove(str(op.mapping)))
            elif op.kind == "add":
                await _record_op(report, "added", op.mapping, self._add_desired(op.mapping, settings))
            elif op.kind == "replace":
                await _record_op(report, "switched", op.mapping, self._replace(op.mapping, settings))
            elif op.kind == "switch":
                await _record_op(report, "switched", op.mapping, self.switch(str(op.mapping), settings.mode))
        return report

    async def _add_desired(self, mapping: Mapping, settings: Settings) -> None:
        """Add a config mapping: kept (as failed, retried) even when it cannot start now."""
        async with self.lock:
            self._check_free(mapping)
            self.check_settings(mapping, settings)
            entry = Entry(settings, "config")
            self._give_policy(entry)
            self.entries[mapping] = entry  # a config mapping: nothing to save
            ok = await self.realise(mapping, entry)
            self._changed()
            if not ok:
                raise SystemFailure(entry.error or "cannot start")

    async def _replace(self, mapping: Mapping, settings: Settings) -> None:
        """New per-mapping options: the mapping restarts with them (connections run on)."""
        await self.remove(str(mapping))
        await self._add_desired(mapping, settings)

    # --- start and stop ---------------------------------------------------------------------------
    async def start(self, config: Config) -> list[str]:
        """Reconcile: config mappings plus API (and CNI) mappings from the saved state.

        Kernel mappings go in as one atomic batch that also replaces whatever a crashed
        run left in the table (with the ids they had, so live flows keep their counters);
        then the listeners. A mapping that cannot start is kept as failed, reported (one
        line each), and retried; the others start. Nothing in the state is ever dropped,
        and a state the disk will not save again does not stop the start: the daemon
        serves and retries the save.
        """
        async with self.lock:  # the API already answers: an add waits until the start is over
            return await self._start(config)

    async def _start(self, config: Config) -> list[str]:
        saved = self.store.load() if self.store is not None else []
        desired = {m: Entry(d.settings, d.origin, d.owner, kernel_id=d.kernel_id)
                   for m, d in plan.desired_at_start(saved, config).items()}
        for entry in desired.values():
            self._give_policy(entry)
        try:
            check_no_overlap(list(desired))
        except SpecError as exc:
            raise Conflict(f"saved and configured mappings conflict: {exc}") from None
        try:  # its lock first: a plugin then leaves the table alone until this start is over
            await self.realiser.kernel_path()
        except PortproxyError:
            pass  # reported by _install_kernel_table, which needs it
        departed = await self.realiser.in_worker(adopt.read_departures)
        adopt.drop_departed(desired, set(departed.values()))
        adopted = adopt.merge(await self.realiser.in_worker(adopt.read_all), desired,
                              lambda owner: Entry(Settings("kernel"), "cni", owner))
        self.entries = desired
        refused: dict[Mapping, str] = {}
        for mapping, entry in desired.items():
            try:
                self.check_settings(mapping, entry.settings)
            except BadInput as exc:
                refused[mapping] = str(exc)
        dnat_present = await self._install_kernel_table({m: e for m, e in desired.items() if m not in refused})
        for mapping, entry in desired.items():
            if mapping in refused:
                self._mark_failed(mapping, entry, refused[mapping])
            else:
                await self.realise(mapping, entry, dnat_present)
        await self.realiser.in_worker(adopt.forget_running, adopted)  # after ours are in: no gap
        self.save_quietly()
        await self._expect_departures(consumed=departed, force=True)
        self.upkeep.start()
        return [f"{m}: {e.error}" for m, e in desired.items() if e.status == "failed"]

    async def _install_kernel_table(self, entries: dict[Mapping, Entry]) -> bool:
        """One batch for every kernel mapping at start (replacing a crashed run's table); True
        when their DNAT is in. Mappings the batch cannot take are then tried one by one."""
        steps = plan.start_table({m: (e.path, e.kernel_id) for m, e in entries.items()}, self.options.kernel)
        try:
            await self.realiser.kernel_path()
        except PortproxyError as exc:
            if not isinstance(steps[0], plan.ClearTable):
                log.error("the kernel path is unavailable: %s", exc)
            return False
        if isinstance(steps[0], plan.ClearTable):
            await self.realiser.run(steps)  # a previous run's table
            return False
        try:
            await self.realiser.run(steps)
        except PortproxyError as exc:
            log.warning("installing the kernel mappings in one batch failed (%s); trying them one by one", exc)
            return False
        return True

    async def stop(self, keep_kernel_rules: bool | None = None) -> None:
        """Drain userland connections; remove the kernel table unless told to keep it."""
        self.upkeep.stop()
        keep = self.options.keep_kernel_rules if keep_kernel_rules is None else keep_kernel_rules
        if self._departures_expected and not any(e.origin == "cni" for e in self.entries.values()):
            await self._expect_departures(force=True)  # no CNI mapping to keep word for
        await self.realiser.stop(keep)

    # --- for the API, the delegate and the daemon -------------------------------------------------
    def adopt_socket(self, sock: socket.socket) -> tuple[str, str, int]:
        """A socket passed by systemd, for the mapping that listens where it is bound."""
        return self.realiser.proxy.adopt(sock)

    def mode_of(self, mapping: Mapping) -> str:
        return self.entries[mapping].mode

    def has_owner(self, owner_id: str) -> bool:
        """Whether any mapping belongs to this owner (a container)."""
        return any(e.owner and e.owner.get("id") == owner_id for e in self.entries.values())

    def connection_count(self) -> int:
        return self.realiser.proxy.connection_count()

    def summary(self) -> str:
        return readmodel.summary(self)

    def health(self) -> dict[str, Any]:
        return readmodel.health(self)

    def daemon_status(self) -> dict[str, Any]:
        return readmodel.daemon_status(self)

    async def describe(self) -> list[dict[str, Any]]:
        return await readmodel.describe(self)

    def metrics_snapshot(self) -> list["MappingSnapshot"]:
        return readmodel.metrics_snapshot(self)

    def daemon_counters(self) -> dict[str, int]:
        return readmodel.daemon_counters(self)


def _record(m: Mapping, e: Entry | None) -> SavedEntry | None:
    return SavedEntry(m, e.settings, e.origin, e.owner, e.kernel_id) if e is not None and e.persisted else None


def _apply(entries: dict[Mapping, Entry], changes: dict[Mapping, Entry | None]) -> None:
    for m, e in changes.items():
        if e is None:
            entries.pop(m, None)
        else:
            entries[m] = e


async def _record_op(report: dict[str, list[str]], what: str, mapping: Mapping, op: Any) -> None:
    try:
        await op
        report[what].append(str(mapping))
    except PortproxyError as exc:
        report["errors"].append(f"{mapping}: {exc}")
        log.error("reload: %s: %s", mapping, exc)


def _warn_if_not_local(mapping: Mapping) -> None:
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
            log.warning("%s: %s is not an address of this host (yet); nothing reaches it until it is", mapping, ip)
    finally:
        probe.close()


__all__ = ["Config", "Controller", "Entry"]
