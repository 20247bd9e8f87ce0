"""The CNI plugin's mappings in the kernel: the ``inet portproxy_cni`` table.

Why a table of its own: ``portproxy serve`` rewrites its ``inet portproxy`` table wholesale
whenever it starts, so elements another process put there would vanish. This table is
built by the same builders (same O(1) dispatch through hash maps, same counters), with
mapping ids from :data:`ID_MIN` up so a flow's conntrack mark never names a daemon mapping.

The plugin lives for one command, so every piece of bookkeeping is in the table itself:
each mapping id's @to_target element carries a comment naming its owner (network,
container id, ifname, see :class:`~portproxy.cni.protocol.Owner`), its @to_client element
one naming the pod (``NAMESPACE/POD``, for a daemon that adopts it), and the id maps say
which keys belong to which id. DEL, CHECK and GC read the table, pick the owner's
elements, and delete exactly those in one atomic batch; another container's elements
are never touched. Writers in the same network namespace are serialised by a lock that
is itself per namespace (an abstract unix socket), so read-then-write cannot race.

The table's options (snat, masqAll, conditions) are set by the ADD that creates it and
last until the DEL or GC that removes its last mapping deletes it (portmap shares its
chains across networks in the same way).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import ipaddress
import socket
import time
from typing import Any, Callable, Iterator

from ..kernel import builders
from ..kernel.builders import MAX_DAEMON_ID, KernelOptions, kind_maps
from ..kernel.executor import Nft, NftError
from ..kernel.ids import IdsExhausted, allocate_ids
from ..spec import Mapping
from . import departures
from .protocol import (ERR_CHECK_FAILED, ERR_IO, ERR_PORT_TAKEN, ERR_TRY_AGAIN, CniError, Config, Owner,
                       gc_doomed)

TABLE = "portproxy_cni"
ID_MIN = MAX_DAEMON_ID + 1
"""CNI mapping ids: 0x8000-0xFFFF (the daemon allocates from 1 up)."""
LOCK_NAME = b"\0portproxy-cni-lock"
LOCK_TIMEOUT = 30.0

KINDS = [(family, with_address) for family in (4, 6) for with_address in (False, True)]


def options(conf: Config) -> KernelOptions:
    """The table's options from the network configuration (portmap's ``snat`` defaults to true)."""
    return KernelOptions(route_localnet=conf.snat, masquerade_published=conf.snat,
                         masquerade_all=conf.snat and conf.masq_all, conditions=conf.conditions, table=TABLE)


@contextlib.contextmanager
def namespace_lock(timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold a lock shared by every plugin process of this network namespace.

    Abstract unix socket names are per network namespace and vanish with the process,
    so a crashed plugin can never leave the lock held and no file is needed.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                sock.bind(LOCK_NAME)
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                if time.monotonic() > deadline:
                    raise CniError(ERR_TRY_AGAIN, "another portproxy-cni command holds the lock", "try again") from None
                time.sleep(0.005)
        yield
    finally:
        sock.close()


# --- reading the table ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Entry:
    """One published host port as the table holds it."""

    id_map: str
    addr_map: str
    port_map: str
    key: tuple[Any, ...]
    mark: int
    target: str
    target_port: int
    targets_set: str


@dataclasses.dataclass
class State:
    present: bool = False
    entries: list[Entry] = dataclasses.field(default_factory=list)
    owners: dict[int, str] = dataclasses.field(default_factory=dict)
    """mark → owner token, from the @to_target comments."""
    labels: dict[int, str] = dataclasses.field(default_factory=dict)
    """mark → ``NAMESPACE/POD``, from the @to_client comments (display only)."""

    def owned_by(self, doomed: Callable[[str], bool]) -> tuple[list[Entry], set[int]]:
        marks = {mark for mark, token in self.owners.items() if doomed(token)}
        return [e for e in self.entries if e.mark in marks], marks


def _key(value: Any) -> tuple[Any, ...]:
    if isinstance(value, dict) and "elem" in value:
        value = value["elem"]["val"]
    if isinstance(value, dict) and "concat" in value:
        return tuple(value["concat"])
    return (value,)


def parse_state(listing: dict) -> State:
    """A :class:`State` from ``nft -j list table`` output (pure)."""
    sets: dict[str, list[Any]] = {}
    present = False
    for item in listing.get("nftables", []):
        if "table" in item:
            present = True
        body = item.get("map") or item.get("set")
        if body:
            sets[body["name"]] = body.get("elem", [])
    state = State(present=present)
    for name, found in (("to_target", state.owners), ("to_client", state.labels)):
        for elem in sets.get(name, []):
            if isinstance(elem, dict) and "comment" in elem.get("elem", {}):
                found[elem["elem"]["val"]] = elem["elem"]["comment"]
    for family, with_address in KINDS:
        id_name, addr_name, port_name = kind_maps(family, with_address)
        addrs = {_key(k): v for k, v in sets.get(addr_name, [])}
        ports = {_key(k): v for k, v in sets.get(port_name, [])}
        for wrapped, mark in sets.get(id_name, []):
            key = _key(wrapped)
            state.entries.append(Entry(id_name, addr_name, port_name, key, mark, addrs.get(key, ""),
                                       ports.get(key, 0), f"targets{family}"))
    return state


def read_state(nft: Nft, opts: KernelOptions) -> State:
    try:
        listing = nft.query(builders.list_table(opts))
    except NftError:
        return State()  # no table yet
    return parse_state(listing)


# --- changes ---------------------------------------------------------------------------------

def removal(state: State, doomed: list[Entry], marks: set[int], opts: KernelOptions) -> list[dict]:
    """Commands deleting ``doomed`` entries and ``marks``; a target another entry still uses stays."""
    gone = set(id(e) for e in doomed)
    still_used = {(e.targets_set, e.target) for e in state.entries if id(e) not in gone}
    elements: list[tuple[str, Any]] = []
    for e in doomed:
        key = {"concat": list(e.key)}
        elements += [(e.id_map, key), (e.addr_map, key), (e.port_map, key)]
    for mark in sorted(marks):
        elements += [("to_target", mark), ("to_client", mark)]
    for name, target in sorted({(e.targets_set, e.target) for e in doomed} - still_used):
        if target:
            elements.append((name, target))
    return builders.delete_elements(opts, elements)


DAEMON = KernelOptions()
"""The daemon's table (``inet portproxy``), as its builders name it. The plugin reads it (the
ports it publishes are taken) and adds nothing to it; its one change there is withdrawing a
deleted container's DNAT while the daemon is away (:meth:`NftBackend.withdraw_kept`)."""


def withdrawal(state: State, mappings: list[Mapping], opts: KernelOptions) -> list[dict]:
    """Commands deleting from ``state`` (another table) exactly the elements of ``mappings``:
    the same key *and* the same target, so another container's mapping of the port stays (pure)."""
    wanted = {(name, key): (str(m.target_ip), port) for m in mappings for name, key, port in builders.element_keys(m)}
    doomed = [e for e in state.entries if wanted.get((e.id_map, e.key)) == (e.target, e.target_port)]
    gone = set(id(e) for e in doomed)
    marks = {e.mark for e in doomed} - {e.mark for e in state.entries if id(e) not in gone}
    return removal(state, doomed, marks, opts) if doomed else []


def host_port_of(id_map: str, key: tuple[Any, ...]) -> tuple[tuple[int, str, int], Any]:
    """((family, protocol, port), host address or None) of an element key of ``id_map``."""
    family = 4 if id_map.startswith("id4") else 6
    return (family, key[-2], key[-1]), (key[0] if len(key) == 3 else None)


class NftBackend:
    """Mappings written straight into the kernel (no daemon).

    :class:`~portproxy.cni.with_daemon.DaemonBackend` has the same operations (add, remove,
    check, gc, ready) through ``portproxy serve``'s API; :func:`portproxy.cni.main.backend_for`
    picks one. The methods after those are this table's part while a daemon is away.
    """

    def __init__(self, opts: KernelOptions) -> None:
        self.opts = opts
        try:
            self.nft = Nft()
        except NftError as exc:
            raise CniError(ERR_IO, str(exc)) from None

    def ready(self) -> None:
        """STATUS: the libnftables context was made (CAP_NET_ADMIN, the library): nothing more to ask."""

    def _apply(self, commands: list[dict]) -> None:
        try:
            self.nft.apply(commands)
        except NftError as exc:
            raise CniError(ERR_IO, str(exc)) from None

    def add(self, owner: Owner, mappings: list[Mapping]) -> None:
        """Publish ``mappings`` for ``owner``, replacing what it had; refuse a port another owner holds."""
        token = owner.token()
        with namespace_lock():
            state = read_state(self.nft, self.opts)
            mine, my_marks = state.owned_by(lambda t: t == token)
            held: dict[tuple[int, str, int], list[tuple[Any, str | None]]] = {}
            for e in state.entries:
                port, address = host_port_of(e.id_map, e.key)
                held.setdefault(port, []).append((address, state.owners.get(e.mark)))
            # The daemon's table: its own mappings, and those of a daemon that is away (its
            # rules kept, or crashed) -- but not this very target, which is this container's.
            targets = {(str(m.target_ip), port) for m in mappings for _, _, port in builders.element_keys(m)}
            for e in read_state(self.nft, DAEMON).entries:
                if (e.target, e.target_port) not in targets:
                    port, address = host_port_of(e.id_map, e.key)
                    held.setdefault(port, []).append((address, "the portproxy daemon's table"))
            for m in mappings:
                for name, key, _ in builders.element_keys(m):
                    port, address = host_port_of(name, key)
                    for other_address, other in held.get(port, []):
                        # An all-addresses mapping shadows every address-specific one of its port.
                        if other != token and (address is None or other_address is None or address == other_address):
                            raise CniError(ERR_PORT_TAKEN, f"{m.proto} host port {port[2]} is already published",
                                           f"by {other or 'another program'}")
            marks = {e.mark for e in state.entries} | set(state.owners)
            try:
                ids = allocate_ids([None] * len(mappings), {mark >> builders.CT_MARK_SHIFT for mark in marks},
                                   ID_MIN, builders.MAX_MAPPING_ID)
            except IdsExhausted as exc:
                raise CniError(ERR_IO, f"too many CNI mappings in this namespace (at most {exc.capacity})") from None
            if state.present:
                commands = removal(state, mine, my_marks, self.opts) if mine or my_marks else []
            else:
                commands = builders.full_table([], self.opts)
            commands += builders.add_mappings(zip(mappings, ids), self.opts, comment=token, label=owner.label())
            self._apply(commands)

    def remove(self, owner: Owner) -> None:
        """DEL: the attachment's mappings go (none is fine: DEL is idempotent)."""
        token = owner.token()
        self.delete(lambda t: t == token)

    def withdraw_kept(self, mappings: list[Mapping]) -> bool:
        """While the daemon is away, its table may still DNAT a deleted container's ports
        (``keep_kernel_rules``, or a crash), towards an address the runtime will give to
        the next container: take exactly those elements out now (the daemon rewrites its
        table whole when it starts). Whether anything was there to take out."""
        with namespace_lock():
            commands = withdrawal(read_state(self.nft, DAEMON), mappings, DAEMON)
            if commands:
                self._apply(commands)
            return bool(commands)

    def daemon_table_locked(self) -> bool:
        """Whether a daemon holds its table's lock (:mod:`portproxy.lock`): it does from before
        it reads the departures at its start, so a plugin seeing it free may still withdraw."""
        from ..lock import held, table_lock_path

        return held(table_lock_path(DAEMON.table))

    def daemon_expects_word(self) -> bool:
        """Whether a daemon that held CNI mappings here keeps its departures table (:mod:`.departures`)."""
        try:
            return departures.read(self.nft) is not None
        except NftError as exc:
            raise CniError(ERR_IO, str(exc)) from None

    def leave_word(self, owner: Owner) -> bool:
        """Tell an absent daemon that this attachment is gone (:mod:`.departures`); False
        when no daemon expects word (it never held CNI mappings here)."""
        with namespace_lock():
            try:
                return departures.record(self.nft, owner.token())
            except NftError as exc:
                raise CniError(ERR_IO, str(exc)) from None

    def delete(self, doomed: Callable[[str], bool]) -> int:
        """Remove every mapping whose owner token ``doomed`` accepts; the table goes with the last one."""
        with namespace_lock():
            state = read_state(self.nft, self.opts)
            if not state.present:
                return 0
            entries, marks = state.owned_by(doomed)
            if not entries and not marks:
                return 0
            if all(e.mark in marks for e in state.entries) and set(state.owners) <= marks:
                self._apply(builders.delete_table(self.opts))
            else:
                self._apply(removal(state, entries, marks, self.opts))
            return len(entries)

    def check(self, owner: Owner, mappings: list[Mapping]) -> None:
        """Raise unless every port of ``mappings`` is in the table, owned by ``owner``, to the right target."""
        token = owner.token()
        state = read_state(self.nft, self.opts)
        have = {(e.id_map, e.key): e for e in state.entries if state.owners.get(e.mark) == token}
        for m in mappings:
            for name, key, target_port in builders.element_keys(m):
                e = have.get((name, key))
                if e is None or ipaddress.ip_address(e.target) != m.target_ip or e.target_port != target_port:
                    raise CniError(ERR_CHECK_FAILED, f"mapping {m} is missing or altered in table inet {TABLE}")

    def gc(self, network: str, keep: set[tuple[str, str]]) -> int:
        return self.delete(lambda token: gc_doomed(token, network, keep))


# --- what the rules depend on ----------------------------------------------------------

def routed_interface(address: ipaddress.IPv4Address, route_table: str) -> str | None:
    """The interface of the longest-prefix IPv4 route to ``address`` in /proc/net/route's text (pure)."""
    best: tuple[int, str] | None = None
    value = int(address)
    for line in route_table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        iface, dest, mask = fields[0], int(fields[1], 16), int(fields[7], 16)
        # /proc/net/route prints addresses in host (little-endian) byte order.
        dest, mask = int.from_bytes(dest.to_bytes(4, "little"), "big"), int.from_bytes(mask.to_bytes(4, "little"), "big")
        if value & mask == dest:
            length = bin(mask).count("1")
            if best is None or length > best[0]:
                best = (length, iface)
    return best[1] if best else None


def enable_route_localnet(address: ipaddress.IPv4Address) -> str | None:
    """Set route_localnet on the interface routing to the container, as portmap does, so
    127.0.0.1:hostPort can be DNAT'd across it. Returns the interface, or None."""
    try:
        with open("/proc/net/route") as f:
            iface = routed_interface(address, f.read())
    except OSError:
        return None
    if iface is None or "/" in iface or iface.startswith("."):
        return None
    path = f"/proc/sys/net/ipv4/conf/{iface}/route_localnet"
    try:
        with open(path) as f:
            if f.read().strip() == "1":
                return iface
        with open(path, "w") as f:
            f.write("1")
    except OSError as exc:
        raise CniError(ERR_IO, f"unable to enable route_localnet on {iface}: {exc.strerror}") from None
    return iface
