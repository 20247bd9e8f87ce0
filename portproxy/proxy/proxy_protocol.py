"""PROXY protocol headers (HAProxy's proxy-protocol.txt, versions 1 and 2): pure encoders.

A target that cannot see the client's address on the wire (the userland proxy
connects from the host) can be told it in a header the proxy writes on the upstream
connection before any payload. nginx (``listen ... proxy_protocol``), HAProxy
(``accept-proxy``), Traefik and Envoy parse it.

What is encoded, per connection:

* the *source* is the client's address and port (``getpeername`` of the accepted
  socket) and the *destination* the address and port the client connected to
  (``getsockname``), as HAProxy's ``send-proxy`` does;
* an IPv4 client on a dual-stack (``[::]``) listener arrives as ``::ffff:a.b.c.d``:
  both addresses are unmapped and sent as TCP4, which is what the client really is;
* v1 ``UNKNOWN`` / v2 ``LOCAL`` say "no client to speak for". Every connection the
  proxy relays has one, so the relay never sends them; they are here because the
  specification pairs them with the others and health-check tooling may want them.

TCP only: the specification leaves PROXY over UDP (v2 family bytes 0x12 / 0x22) to
the receiver's interpretation, per datagram, and none of the receivers above parse it
on a UDP listener. ``portproxy map`` refuses ``--proxy-protocol`` for a UDP mapping.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
"""The 12-byte v2 signature (0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A)."""
V2_VERSION = 0x20
V2_LOCAL = V2_VERSION | 0x0
V2_PROXY = V2_VERSION | 0x1
AF_UNSPEC, AF_INET4, AF_INET6_ = 0x00, 0x10, 0x20
STREAM, DGRAM = 0x1, 0x2
TCP4 = AF_INET4 | STREAM  # 0x11
TCP6 = AF_INET6_ | STREAM  # 0x21
V1_MAX = 107
"""Longest v1 line, CRLF included (a receiver may read no further)."""

VERSIONS = ("v1", "v2")

Address = tuple[str, int]


class ProxyProtocolError(ValueError):
    """Addresses the header cannot carry (mixed families)."""


def _unmapped(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    addr = ipaddress.ip_address(ip.partition("%")[0])  # a link-local scope id is not sent
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _pair(src: Address, dst: Address) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address,
                                               ipaddress.IPv4Address | ipaddress.IPv6Address]:
    s, d = _unmapped(src[0]), _unmapped(dst[0])
    if s.version != d.version:
        raise ProxyProtocolError(f"source {s} and destination {d} are of different families")
    return s, d


def v1(src: Address, dst: Address) -> bytes:
    """``PROXY TCP4|TCP6 SRC DST SPORT DPORT\\r\\n`` (addresses in their shortest text form)."""
    s, d = _pair(src, dst)
    proto = "TCP4" if s.version == 4 else "TCP6"
    return f"PROXY {proto} {s} {d} {src[1]} {dst[1]}\r\n".encode("ascii")


def v1_unknown() -> bytes:
    return b"PROXY UNKNOWN\r\n"


def v2(src: Address, dst: Address) -> bytes:
    """Signature, PROXY command, TCP4 (0x11) or TCP6 (0x21), length, addresses and ports."""
    s, d = _pair(src, dst)
    body = s.packed + d.packed + struct.pack("!HH", src[1], dst[1])
    family = TCP4 if s.version == 4 else TCP6
    return V2_SIGNATURE + struct.pack("!BBH", V2_PROXY, family, len(body)) + body


def v2_local() -> bytes:
    """LOCAL command, UNSPEC family, no address block: the receiver uses the real peer."""
    return V2_SIGNATURE + struct.pack("!BBH", V2_LOCAL, AF_UNSPEC, 0)


def refusal(proto: str, mode: str, version: str | None) -> str | None:
    """Why a mapping of ``proto`` on path ``mode`` cannot carry a PROXY header, or None.

    For ``map``, ``add`` and a ``switch``: a header needs the userland path on TCP."""
    if version is None:
        return None
    if mode != "userland":
        return f"--proxy-protocol needs the userland path: DNAT cannot add a header (mode {mode})"
    if proto != "tcp":
        return "--proxy-protocol is for TCP mappings (no common receiver parses it over UDP)"
    return None


def header_for(version: str, client: socket.socket) -> bytes:
    """The header for an accepted client socket (two syscalls: peer and local name)."""
    src = client.getpeername()
    dst = client.getsockname()
    return v1(src, dst) if version == "v1" else v2(src, dst)
