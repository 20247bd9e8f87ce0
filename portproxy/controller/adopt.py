"""A daemon starting later adopts what the CNI plugin installed without it.

``portproxy serve`` calls :func:`read_all` at start, registers each mapping as a ``cni``
entry (persisted, kernel path), installs its own table, and only then calls
:func:`forget` for those that run: make before break, so a published port never has a
moment without its DNAT, and flows already translated keep their conntrack entries.

Runs on the daemon's worker thread (libnftables blocks).
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any, Callable, Iterable

from ..kernel.builders import KernelOptions
from ..kernel.executor import Nft, NftError
from ..spec import WILDCARDS, Mapping, SpecError, check_no_overlap
from ..cni import departures
from ..cni.protocol import CniError, Owner, token_network
from ..cni.table import TABLE, NftBackend, State, host_port_of, read_state

OPTIONS = KernelOptions(table=TABLE)
log = logging.getLogger("portproxy.controller")


def mappings_of(state: State) -> list[tuple[Mapping, str, str | None]]:
    """Every mapping of a table as (mapping, owner token), ranges joined again (pure).

    Each mapping the plugin wrote has one id (mark) and one element per host port, so
    an id's consecutive ports with consecutive target ports are one mapping again."""
    by_mark: dict[tuple[int, str], list] = {}
    for e in state.entries:
        by_mark.setdefault((e.mark, e.id_map), []).append(e)
    out: list[tuple[Mapping, str, str | None]] = []
    for (mark, _), entries in sorted(by_mark.items()):
        token = state.owners.get(mark)
        ports = sorted(((host_port_of(e.id_map, e.key), e.target_port, e.target) for e in entries),
                       key=lambda item: item[0][0][2])
        (family, proto, first), address = ports[0][0]
        last = ports[-1][0][0][2]
        if token is None or not ports[0][2] or len(ports) != last - first + 1:
            continue  # not something this plugin wrote
        host_ip = ipaddress.ip_address(address) if address is not None else WILDCARDS[family]
        out.append((Mapping(proto, host_ip, first, last, ipaddress.ip_address(ports[0][2]),  # type: ignore[arg-type]
                            ports[0][1], ports[-1][1]), token, state.labels.get(mark)))
    return out


def owner_of_token(token: str, label: str | None = None) -> dict[str, str]:
    """The controller's owner object for a table token and label (``NAMESPACE/POD`` or ``POD``)."""
    cid, ifname, network = token_network(token)
    owner = {"kind": "cni", "id": cid, "ifname": ifname, "network": network}
    namespace, _, pod = (label or "").rpartition("/")
    owner.update({k: v for k, v in (("name", pod), ("namespace", namespace)) if v})
    return owner


def read_all() -> list[tuple[Mapping, dict[str, str]]]:
    """The plugin's mappings in this network namespace with their owners; none when no table."""
    try:
        state = read_state(Nft(), OPTIONS)
    except NftError:
        return []
    return [(m, owner_of_token(token, label)) for m, token, label in mappings_of(state)]


def forget(owners: Iterable[dict[str, str]]) -> int:
    """Delete these owners' mappings from the plugin's table (the table goes with its last)."""
    tokens = {Owner.from_controller(o).token() for o in owners}
    if not tokens:
        return 0
    return NftBackend(OPTIONS).delete(lambda token: token in tokens)


def merge(found: list[tuple[Mapping, dict[str, str]]], desired: dict[Mapping, Any],
          make_entry: Callable[[dict[str, str]], Any]) -> list[tuple[Mapping, Any]]:
    """Add the found mappings to the daemon's ``desired`` entries (made by ``make_entry(owner)``);
    return the adopted (mapping, entry) pairs. One the daemon already has for the same
    container counts as adopted; one that overlaps another mapping stays in the plugin's table."""
    fresh = [(m, o) for m, o in found if m not in desired]
    try:
        check_no_overlap([*desired, *(m for m, _ in fresh)])
        clash: Callable[[Mapping], bool] = lambda m: False  # noqa: E731
    except SpecError:
        def clash(m: Mapping) -> bool:
            try:
                check_no_overlap([*desired, m])
            except SpecError as exc:
                log.warning("not adopting %s from table inet %s: %s", m, TABLE, exc)
                return True
            return False
    adopted = []
    for m, owner in found:
        entry = desired.get(m)
        if entry is None and not clash(m):
            entry = desired[m] = make_entry(owner)
        if entry is not None and (entry.owner or {}).get("id") == owner["id"]:
            adopted.append((m, entry))
    if adopted:
        log.info("adopting %d mapping(s) portproxy-cni installed in table inet %s", len(adopted), TABLE)
    return adopted


def forget_running(adopted: list[tuple[Mapping, Any]]) -> None:
    """Once the daemon runs them: delete from the plugin's table the owners whose adopted
    mappings all run (a failed one keeps its DNAT there, so nothing loses its port)."""
    failed = {e.owner["id"] for _, e in adopted if e.status != "running"}
    try:
        forget([e.owner for _, e in adopted if e.owner["id"] not in failed])
    except (CniError, NftError) as exc:
        log.error("removing adopted mappings from table inet %s failed: %s", TABLE, exc.args[0])


# --- departures: DELs the daemon missed while it was away (see portproxy.cni.departures) --------------------------

def read_departures() -> dict[int, str]:
    """key → owner token of every DEL no daemon answered (none when there is no table)."""
    try:
        return departures.read(Nft()) or {}
    except NftError:
        return {}


def drop_departed(desired: dict[Mapping, Any], tokens: set[str]) -> list[Mapping]:
    """Remove from ``desired`` the CNI entries whose attachment was deleted meanwhile (pure)."""
    def departed(owner: dict[str, str]) -> bool:
        try:
            return Owner.from_controller(owner).token() in tokens
        except CniError:  # an id too long for a token: no DEL could have recorded it
            return False

    gone = [m for m, e in desired.items() if e.origin == "cni" and e.owner and departed(e.owner)]
    for m in gone:
        del desired[m]
        log.info("dropping %s: its container was deleted while the daemon was away", m)
    return gone


def settle_departures(consumed: Iterable[int], expect: bool) -> None:
    """After the daemon acted on ``consumed`` words: delete them, and keep the table while
    the daemon holds CNI mappings (``expect``) so DELs made in its absence reach it."""
    try:
        departures.settle(Nft(), consumed, expect)
    except NftError as exc:
        log.error("updating table inet %s failed: %s", departures.TABLE, exc.args[0])
