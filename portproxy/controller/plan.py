"""What each change of the controller means, as an ordered list of steps (pure: no I/O, no asyncio).

A mapping's mode is a set of *components*: ``userland`` a listener, ``kernel`` its DNAT,
``hybrid`` both (the DNAT serves what it can, the listener the rest: Docker's default
shape). Every change of one mapping (add, remove, switch, a start or retry) is a move
from one component set to another, planned here as steps the
:class:`~portproxy.controller.realiser.Realiser` runs with one undo stack:

* *make* steps first: hold the ports (a port someone else holds is refused before any
  DNAT goes in), put the DNAT in, serve;
* :class:`Commit`: the new desired state is saved; a refused save undoes the make steps
  and nothing was broken;
* *break* steps last: a grace pause (handshakes under way when the DNAT landed finish on
  the listener), stop listening (keep the port), release the ports, take the DNAT out,
  and forget the UDP conntrack entries, so UDP flows take the new path too.

Two rules decide which family runs where, here and nowhere else: what DNAT cannot serve
(an IPv6 client to an IPv4 target, a loopback address) is proxied
(:func:`proxied_reason`), and a CNI runtime's mappings hold no ports (the runtime holds
them: only their DNAT, only for the families it can serve).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Collection, Iterable, Mapping as MappingType, Sequence, Union

from .. import schema
from ..kernel.builders import KernelOptions, why_not_translated
from ..proxy.options import ProxyOptions
from ..spec import Mapping, Part
from .auto import COOL, HOT  # noqa: F401 - an auto mapping's places, for the planner's callers

if TYPE_CHECKING:
    from .config import Config, Mode, Settings

LISTENER, KERNEL = "listener", "kernel"
SWITCH_GRACE = 0.2
"""Seconds a listener keeps accepting after the DNAT in front of it went in, so that
handshakes already under way when the rule landed complete against it."""
PERSISTED_ORIGINS = ("api", "cni")
"""Config mappings come from the file each start; docker ones live as long as dockerd's proxy."""


def components(mode: Mode) -> frozenset[str]:
    """``auto`` is its light place (its listener is there in both places; where its DNAT
    is, is the entry's :attr:`~.entry.Entry.path`, which is what plans are made from)."""
    return {"userland": frozenset({LISTENER}), "kernel": frozenset({KERNEL}),
            "hybrid": frozenset({LISTENER, KERNEL}), "auto": frozenset({LISTENER})}[mode]


def proxied_reason(part: Part, kernel: KernelOptions) -> str | None:
    """Why DNAT cannot serve this family of a mapping (then it is proxied), None when it can."""
    return why_not_translated(part, kernel)


def part_components(part: Part, wanted: Collection[str], kernel: KernelOptions) -> frozenset[str]:
    """What one family of a mapping runs: what its mode asks, except that what DNAT cannot
    serve is proxied, as Docker does."""
    if wanted and proxied_reason(part, kernel):
        return frozenset({LISTENER})
    return frozenset(wanted)


def served_by(parts: Collection[str]) -> str:
    """The mode name of one family's components."""
    return "hybrid" if set(parts) == {LISTENER, KERNEL} else "kernel" if set(parts) == {KERNEL} else "userland"


def mapping_options(settings: Settings, defaults: ProxyOptions) -> ProxyOptions:
    """The proxy options of one mapping: the daemon's, with the mapping's overrides."""
    return schema.proxy_options(dict(settings.overrides), defaults)


def is_transparent(settings: Settings, defaults: ProxyOptions) -> bool:
    """Whether the mapping's listener needs transparent mode's routing (``source = "client"``)."""
    return LISTENER in components(settings.mode) and mapping_options(settings, defaults).source == "client"


# --- the steps -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Hold:
    """Bind every port of one family (listening at once if ``serve``, else only held)."""
    part: Part
    options: ProxyOptions
    serve: bool


@dataclasses.dataclass(frozen=True)
class Serve:
    """Listen again on held ports."""
    part: Part


@dataclasses.dataclass(frozen=True)
class Pause:
    """Stop listening, keep the ports bound (what is queued is accepted first)."""
    part: Part


@dataclasses.dataclass(frozen=True)
class Release:
    """Close the ports; live connections run to their end."""
    part: Part
    options: ProxyOptions


@dataclasses.dataclass(frozen=True)
class Dnat:
    """DNAT in and out in one kernel transaction; ``preferred`` ids are kept across restarts."""
    add: tuple[Part, ...] = ()
    remove: tuple[Part, ...] = ()
    preferred: tuple[tuple[Part, int], ...] = ()


@dataclasses.dataclass(frozen=True)
class DnatPresent:
    """The DNAT of these families is in already (the start's batch); undone as a Dnat is."""
    parts: tuple[Part, ...]


@dataclasses.dataclass(frozen=True)
class Hairpin:
    """Hairpin mode on the bridge ports toward these targets (a container reaching its own port)."""
    parts: tuple[Part, ...]


@dataclasses.dataclass(frozen=True)
class InstallTable:
    """Replace the whole nft table with these families' DNAT (the start: a crashed run's table goes)."""
    parts: tuple[Part, ...]
    preferred: tuple[tuple[Part, int], ...] = ()


@dataclasses.dataclass(frozen=True)
class ClearTable:
    """Delete a table left over by a previous run (the start, with no kernel mapping)."""


@dataclasses.dataclass(frozen=True)
class Grace:
    seconds: float = SWITCH_GRACE


@dataclasses.dataclass(frozen=True)
class ForgetUdp:
    """Delete the UDP conntrack entries of these ports (best effort: never fails)."""
    parts: tuple[Part, ...]
    translated: bool


@dataclasses.dataclass(frozen=True)
class ForgetStats:
    """The mapping is gone for good: its counters (and metric series) go."""
    parts: tuple[Part, ...]


@dataclasses.dataclass(frozen=True)
class EnsureRouting:
    """Transparent mode's routing, before the first transparent listener (its replies need it)."""


@dataclasses.dataclass(frozen=True)
class Commit:
    """The point of no return: the new desired state is saved; a refusal undoes what came before."""


Step = Union[Hold, Serve, Pause, Release, Dnat, DnatPresent, Hairpin, InstallTable, ClearTable, Grace,
             ForgetUdp, ForgetStats, EnsureRouting, Commit]


# --- one mapping's move --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Target:
    """What the planner needs to know of one mapping besides its components."""
    options: ProxyOptions = ProxyOptions()
    holds_ports: bool = True
    transparent: bool = False
    kernel_id: int | None = None


def _udp(parts: Iterable[Part]) -> tuple[Part, ...]:
    return tuple(p for p in parts if p.proto == "udp")


def move(mapping: Mapping, old: Collection[str], new: Collection[str], target: Target, kernel: KernelOptions,
         dnat_present: bool = False) -> list[Step]:
    """Every family of ``mapping`` from components ``old`` to ``new``, make before break, with
    the :class:`Commit` between. ``dnat_present``: the start's batch put the DNAT in already."""
    parts = [p for p in mapping.per_family() if target.holds_ports or not proxied_reason(p, kernel)]
    moves = [(p, part_components(p, old, kernel), part_components(p, new, kernel)) for p in parts]
    moves = [(p, po, pn) for p, po, pn in moves if po != pn]
    dnat_in = tuple(p for p, po, pn in moves if KERNEL in pn - po)
    make: list[Step] = []
    if dnat_in and dnat_present:
        make.append(DnatPresent(dnat_in))  # first: if a port cannot be held, its DNAT goes again
    if target.transparent and LISTENER in new and any(LISTENER in pn for _, _, pn in moves):
        make.append(EnsureRouting())
    if target.holds_ports:
        make += [Hold(p, target.options, LISTENER in pn) for p, po, pn in moves if pn and not po]
    if dnat_in and not dnat_present:
        make += [Dnat(add=dnat_in, preferred=tuple((p, target.kernel_id) for p in dnat_in if target.kernel_id)),
                 Hairpin(dnat_in)]
    make += [Serve(p) for p, po, pn in moves if LISTENER in pn - po and po]
    brk: list[Step] = []
    if any(KERNEL in pn - po and LISTENER in po - pn for p, po, pn in moves):
        brk.append(Grace())
    if target.holds_ports:
        brk += [Pause(p) for p, po, pn in moves if LISTENER in po - pn and pn]
        brk += [Release(p, target.options) for p, po, pn in moves if po and not pn]
    dnat_out = tuple(p for p, po, pn in moves if KERNEL in po - pn)
    if dnat_out:
        brk.append(Dnat(remove=dnat_out))
    for translated in (True, False):
        udp = _udp(p for p, po, pn in moves if KERNEL in po ^ pn and (KERNEL in pn) == translated)
        if udp:
            brk.append(ForgetUdp(udp, translated))
    return [*make, Commit(), *brk]


def add(mapping: Mapping, mode: Mode, target: Target, kernel: KernelOptions) -> list[Step]:
    return move(mapping, (), components(mode), target, kernel)


def realise(mapping: Mapping, mode: Mode, target: Target, kernel: KernelOptions,
            dnat_present: bool = False) -> list[Step]:
    """Run a desired mapping that does not run (a start, a retry): an add without a commit of its own."""
    return [s for s in move(mapping, (), components(mode), target, kernel, dnat_present) if not isinstance(s, Commit)]


def remove(mapping: Mapping, mode: Mode, running: bool, target: Target, kernel: KernelOptions) -> list[Step]:
    """Saved first: a refused save touches nothing; then the ports and DNAT go, then the counters."""
    steps = move(mapping, components(mode) if running else (), (), target, kernel)
    return [Commit(), *(s for s in steps if not isinstance(s, Commit)), ForgetStats(tuple(mapping.per_family()))]


def switch(mapping: Mapping, old: Mode, new: Mode, running: bool, target: Target, kernel: KernelOptions) -> list[Step]:
    """A running mapping moves (make, save, break); a failed one only records its new mode."""
    if not running or old == new:
        return [Commit()]
    return move(mapping, components(old), components(new), target, kernel)


def foreground(mappings: Sequence[Mapping], mode: Mode, target: Target, kernel: KernelOptions) -> list[Step]:
    """``portproxy map``: every mapping at once, all or nothing. The ports first (a port
    someone else holds is refused before any DNAT goes in; the families DNAT cannot serve
    listen), then the DNAT of every family it can serve in one batch that replaces the
    table, hairpin mode, and the ports' stale UDP conntrack entries."""
    steps: list[Step] = []
    for m in mappings:
        for step in realise(m, mode, target, kernel, dnat_present=True):
            if isinstance(step, (DnatPresent, ForgetUdp)) or (isinstance(step, EnsureRouting) and step in steps):
                continue  # the DNAT comes in one batch below; the routing once
            steps.append(step)
    if KERNEL in components(mode):
        parts = tuple(p for m in mappings for p in m.per_family() if not proxied_reason(p, kernel))
        steps += [InstallTable(parts), Hairpin(parts)]
        if _udp(parts):
            steps.append(ForgetUdp(_udp(parts), True))
    return steps


# --- a CNI owner's declared set -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class OwnedPlan:
    """What declaring an owner's set of mappings changes: whole mappings, then the per-family
    parts that go in and out of the nft table, and the steps that do it."""

    add: list[Mapping]
    remove: list[Mapping]
    keep: list[Mapping]
    kernel_add: list[Part]
    kernel_remove: list[Part]
    steps: list[Step] = dataclasses.field(default_factory=list)


def declare(current: MappingType[Mapping, Settings], wanted: MappingType[Mapping, Settings],
            installed: Collection[Part], kernel: KernelOptions,
            kernel_ids: MappingType[Mapping, int] | None = None) -> OwnedPlan:
    """From the owner's ``current`` mappings to ``wanted``.

    A mapping with the same spec and settings is kept, untouched. One whose options
    changed is removed and added again, and its DNAT, the same, stays where it is. The
    kernel parts of an added mapping are the families DNAT can serve: the others are
    skipped (a CNI runtime publishes each family its container has). A removed mapping's
    parts go out only if ``installed``. One kernel transaction: with nothing to add, the
    save comes first (a refused save touches nothing), else after it. ``kernel_ids``: the
    ids the owner's mappings had (kept by a mapping added again)."""
    keep = [m for m, settings in wanted.items() if current.get(m) == settings]
    kept = set(keep)
    added = [m for m in wanted if m not in kept]
    removed = [m for m in current if m not in kept]
    add_parts = [p for m in added for p in m.per_family() if not proxied_reason(p, kernel)]
    adding = set(add_parts)
    kernel_add = [p for p in add_parts if p not in installed]
    kernel_remove = [p for m in removed for p in m.per_family() if p in installed and p not in adding]
    ids = kernel_ids or {}
    preferred = tuple((p, ids[m]) for m in added if m in ids for p in m.per_family() if p in kernel_add)
    dnat: list[Step] = [Dnat(tuple(kernel_add), tuple(kernel_remove), preferred)] if kernel_add or kernel_remove else []
    steps: list[Step] = [*dnat, Commit()] if kernel_add else [Commit(), *dnat]
    gone = tuple(p for m in removed if m not in wanted for p in m.per_family())
    if gone:
        steps.append(ForgetStats(gone))
    for parts, translated in ((kernel_add, True), (kernel_remove, False)):
        if _udp(parts):
            steps.append(ForgetUdp(_udp(parts), translated))
    return OwnedPlan(added, removed, keep, kernel_add, kernel_remove, steps)


# --- the start -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Desired:
    """One desired mapping as the start finds it: from the saved state or the config."""
    settings: Settings
    origin: str
    owner: dict[str, str] | None = None
    kernel_id: int | None = None


def desired_at_start(saved: Sequence[Any], config: Config) -> dict[Mapping, Desired]:
    """The saved API and CNI mappings, then the config's (with the kernel id a config mapping
    had last time): ``saved`` items have mapping, settings, origin, owner and kernel_id."""
    desired: dict[Mapping, Desired] = {}
    for item in saved:
        if item.origin in PERSISTED_ORIGINS:
            desired[item.mapping] = Desired(item.settings, item.origin, item.owner, item.kernel_id)
    for mapping, settings in config.mappings.items():
        saved_id = next((s.kernel_id for s in saved if s.mapping == mapping), None)
        desired[mapping] = Desired(settings, "config", kernel_id=saved_id)
    return desired


def start_table(wanted: MappingType[Mapping, tuple[Mode, int | None]], kernel: KernelOptions) -> list[Step]:
    """One batch for every kernel mapping at start, replacing whatever a crashed run left
    (with the ids they had, so live flows keep their counters); with none, a left-over
    table goes. ``wanted``: each mapping's mode and kernel id. Families that hold no port
    are in too: the DNAT of the families DNAT can serve is all any mapping needs."""
    parts = tuple(p for m, (mode, _) in wanted.items() if KERNEL in components(mode) for p in m.per_family()
                  if not proxied_reason(p, kernel))
    if not parts:
        return [ClearTable()]
    owners = {p: kernel_id for m, (_, kernel_id) in wanted.items() for p in m.per_family()}
    preferred = tuple((p, owners[p]) for p in parts if owners[p])
    steps: list[Step] = [InstallTable(parts, preferred), Hairpin(parts)]
    if _udp(parts):
        steps.append(ForgetUdp(_udp(parts), True))
    return steps


# --- a reload --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ReloadOp:
    """One change a reload makes: ``remove``, ``add``, ``replace`` (new per-mapping options:
    removed and added again), ``switch`` (new mode), or ``refuse`` (``reason`` says why)."""
    kind: str
    mapping: Mapping
    settings: Settings | None = None
    reason: str = ""


def reload_diff(current: MappingType[Mapping, tuple[Settings, str]], config: Config) -> list[ReloadOp]:
    """From the running mappings (settings and origin of each) to ``config``'s: removals first."""
    ops = [ReloadOp("remove", m) for m, (_, origin) in current.items()
           if origin == "config" and m not in config.mappings]
    for mapping, settings in config.mappings.items():
        entry = current.get(mapping)
        if entry is None:
            ops.append(ReloadOp("add", mapping, settings))
        elif entry[1] != "config":
            ops.append(ReloadOp("refuse", mapping, settings, f"exists already as a mapping of the {entry[1]} "
                                "(remove it there first); left as it is"))
        elif entry[0].overrides != settings.overrides:
            ops.append(ReloadOp("replace", mapping, settings))
        elif entry[0].mode != settings.mode:
            ops.append(ReloadOp("switch", mapping, settings))
    return ops


def options_changed(old: Iterable[tuple[str, Any]], new: Iterable[tuple[str, Any]]) -> list[str]:
    """The daemon options a reload found changed (they take effect at the next restart)."""
    a, b = dict(old), dict(new)
    return sorted({k for k in {*a, *b} if a.get(k, _MISSING) != b.get(k, _MISSING)})


_MISSING = object()
