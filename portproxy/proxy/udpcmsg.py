"""The ancillary data of the UDP path, read and made without sockets.

What a receive brings: UDP_GRO's segment size (the datagrams of one flow that the
kernel coalesced into this one read) and IP_PKTINFO / IPV6_PKTINFO (the address the
client sent to). What a send takes: UDP_SEGMENT (a GSO run) and the PKTINFO that makes a
reply leave from the address the client sent to.
"""

from __future__ import annotations

import socket
import struct

SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
UDP_GRO = getattr(socket, "UDP_GRO", 104)
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)

RECV_SPACE = socket.CMSG_SPACE(20) + socket.CMSG_SPACE(4) + 16
"""Room for one PKTINFO (IPv6 is the larger) and one UDP_GRO cmsg."""

Cmsg = tuple[int, int, bytes]

_INT = struct.Struct("=i")
_SEGMENT = struct.Struct("=H")


def gro_size(ancdata: list[Cmsg]) -> int:
    """The segment size of a coalesced receive; 0 if the read is one datagram."""
    for level, kind, data in ancdata:
        if level == SOL_UDP and kind == UDP_GRO and len(data) >= 2:
            # The kernel puts an int; a u16 would do (a segment is at most 65535 bytes).
            return _INT.unpack_from(data)[0] if len(data) >= 4 else _SEGMENT.unpack_from(data)[0]
    return 0


def segment_cmsg(size: int) -> Cmsg:
    """UDP_SEGMENT for one GSO send: the kernel cuts the payload into ``size``-byte datagrams."""
    return (SOL_UDP, UDP_SEGMENT, _SEGMENT.pack(size))


def reply_cmsg(ancdata: list[Cmsg]) -> list[Cmsg]:
    """Turn received PKTINFO into the cmsg that makes the reply leave from that address."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            _ifindex, _spec_dst, header_dst = struct.unpack_from("=i4s4s", data)
            return [(socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, header_dst, b"\0" * 4))]
        if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(data) >= 20:
            addr, ifindex = struct.unpack_from("=16sI", data)
            # Keep the interface only where the address needs it (link-local).
            keep = ifindex if addr[:2] == b"\xfe\x80" else 0
            return [(socket.IPPROTO_IPV6, IPV6_PKTINFO, struct.pack("=16sI", addr, keep))]
    return []
