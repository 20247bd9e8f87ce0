"""Delete conntrack entries through netlink (pyroute2), never by shelling out to conntrack(8).

NAT is decided on a flow's first packet, so a UDP "flow" that existed before a
mapping was added, changed or removed keeps its old translation until it idles
out. Docker deletes such entries (moby#44742); so does portproxy. TCP flows are
left alone: established connections must keep working across a change.
"""

from __future__ import annotations

import logging
import socket

log = logging.getLogger("portproxy.kernel")


def delete_udp_flows(ports: list[tuple[int, int]]) -> int:
    """Delete UDP conntrack entries whose original destination port is in one of ``ports``
    (inclusive ranges). Returns how many were deleted. Blocking; call off the loop."""
    from pyroute2 import Conntrack
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    deleted = 0
    with Conntrack() as ct:
        # Filtered in the kernel (5.8+): a host busy with TCP can hold tens of thousands of
        # entries, and decoding them all in Python would take seconds.
        entries = []
        for family in (socket.AF_INET, socket.AF_INET6):
            entries += list(ct.dump_entries(tuple_orig=NFCTAttrTuple(family=family, proto=socket.IPPROTO_UDP)))
        for entry in entries:
            orig = entry.tuple_orig
            if orig.proto != socket.IPPROTO_UDP or orig.dport is None:
                continue
            if any(start <= orig.dport <= end for start, end in ports):
                try:
                    ct.delete(entry)
                    deleted += 1
                except Exception as exc:  # noqa: BLE001 - an entry may expire under our feet
                    log.debug("conntrack delete failed: %s", exc)
    if deleted:
        log.info("deleted %d stale UDP conntrack entr%s", deleted, "y" if deleted == 1 else "ies")
    return deleted

