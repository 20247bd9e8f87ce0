"""Delete conntrack entries through netlink (pyroute2), never by shelling out to conntrack(8).

NAT is decided on a flow's first packet, so a UDP "flow" that existed before a
mapping was added, changed or removed keeps its old translation until it idles
out. Docker deletes such entries (moby#44742); so does portproxy. TCP flows are
left alone: established connections must keep working across a change.

An entry belongs to the port in either direction: usually the client spoke first
(original destination port = the host port), but when conntrack started tracking
in the middle of a flow (the first nft table in a namespace turns it on) or the
proxy answered after the client's entry was deleted, the first packet seen was the
host's reply, and the entry runs from the host port to the client. The client's
datagrams then match it as *replies*, which NAT never translates; such an entry
must go too, or the flow never reaches a DNAT installed later.

One deletion pass is not enough to be sure. A conntrack dump walks a hash table
that other CPUs change under it, and a datagram that was already past the lookup
when its entry was deleted can still be delivered the old way. So after a move
the port is checked again a few times: an entry that still takes the *old* path
(untranslated although the DNAT is in, or DNAT'd although the proxy serves the
port now) is deleted until a pass finds none. Without that, one missed entry
leaves a client's UDP flow talking to a closed port until the entry idles out.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from typing import TYPE_CHECKING, Callable, Iterable

if TYPE_CHECKING:
    from pyroute2.conntrack import ConntrackEntry

log = logging.getLogger("portproxy.kernel")

IPS_DST_NAT = 1 << 5
VERIFY_PASSES = 5
VERIFY_INTERVAL = 0.05

Ports = list[tuple[int, int]]


def delete_udp_flows(ports: Ports, translated: bool | None = None, targets: Iterable[str] = ()) -> int:
    """Delete UDP conntrack entries of one of ``ports`` (inclusive ranges; either direction),
    then make sure none that takes the old path is left.

    ``translated`` says what the port's flows must look like from now on: True when the
    kernel path DNATs them, False when no DNAT may remain (the proxy serves the port, or
    the mapping is gone), None for a single pass without the check. ``targets`` are the mappings'
    target addresses: the proxy's own upstream flows to them are never stale.
    Returns how many entries were deleted. Blocking; call off the loop.
    """
    from pyroute2 import Conntrack

    with Conntrack() as ct:
        deleted = _delete(ct, ports, _any_entry)
        if translated is not None:
            stale = _stale_when_translated(set(targets)) if translated else _stale_when_proxied
            for _ in range(VERIFY_PASSES):
                time.sleep(VERIFY_INTERVAL)
                again = _delete(ct, ports, stale)
                if not again:
                    break
                log.info("deleted %d UDP conntrack entr%s that still took the old path", again, _plural(again))
                deleted += again
    if deleted:
        log.info("deleted %d stale UDP conntrack entr%s", deleted, _plural(deleted))
    return deleted


def _stale_when_translated(targets: set[str]) -> Callable[["ConntrackEntry", str], bool]:
    def stale(entry: "ConntrackEntry", port_address: str) -> bool:
        if entry.status & IPS_DST_NAT:
            return False
        # The proxy's upstream flows (to a target) and loopback clients of a hybrid's
        # loopback listener are untranslated by design.
        return port_address not in targets and not ipaddress.ip_address(port_address).is_loopback

    return stale


def _stale_when_proxied(entry: "ConntrackEntry", port_address: str) -> bool:
    return bool(entry.status & IPS_DST_NAT)


def _any_entry(entry: "ConntrackEntry", port_address: str) -> bool:
    return True


def _delete(ct: object, ports: Ports, wanted: Callable[["ConntrackEntry", str], bool]) -> int:
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    # Filtered in the kernel (5.8+): a host busy with TCP can hold tens of thousands of
    # entries, and decoding them all in Python would take seconds.
    entries = []
    for family in (socket.AF_INET, socket.AF_INET6):
        entries += list(ct.dump_entries(tuple_orig=NFCTAttrTuple(family=family, proto=socket.IPPROTO_UDP)))  # type: ignore[attr-defined]
    deleted = 0
    for entry in entries:
        orig = entry.tuple_orig
        if orig.proto != socket.IPPROTO_UDP or orig.dport is None or orig.sport is None:
            continue
        if any(start <= orig.dport <= end for start, end in ports):
            port_address = orig.daddr  # the client spoke first
        elif any(start <= orig.sport <= end for start, end in ports):
            port_address = orig.saddr  # the host's side spoke first (see the module's docstring)
        else:
            continue
        if wanted(entry, port_address):
            try:
                ct.delete(entry)  # type: ignore[attr-defined]
                deleted += 1
            except TypeError:
                # pyroute2 0.7 (Debian 12's) raises this while reading the kernel's
                # acknowledgement of a delete that took place.
                deleted += 1
            except Exception as exc:  # noqa: BLE001 - an entry may expire under our feet
                log.debug("conntrack delete failed: %s", exc)
    return deleted


def flush() -> None:
    """Delete every conntrack entry of the calling thread's network namespace.

    For the benchmarks, which run many short connections and must start each round with
    an empty table; the daemon never flushes (other flows on the host are not ours)."""
    from pyroute2 import Conntrack

    with Conntrack() as ct:
        ct.flush()


def _plural(n: int) -> str:
    return "y" if n == 1 else "ies"
