"""The mapping grammar: ``[HOST_IP:]HOST_PORT[-END]:TARGET_IP:TARGET_PORT[-END][/tcp|/udp]``.

This is Docker's ``-p`` grammar with the target address added, so an operator who
knows ``docker run -p`` can read a portproxy mapping at a glance. IPv6 addresses
are written in brackets (``[::]:9090:[fd00::2]:80``). Ranges map port to port and
must have equal lengths.

The parser is pure: it never touches the network, and every malformed input
raises :class:`SpecError` (and nothing else) with a message naming the part that
is wrong. The CLI turns that into one line and exit status 2.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any, Iterator, Literal

from .errors import BadInput, shorten

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Protocol = Literal["tcp", "udp"]
PROTOCOLS: tuple[Protocol, ...] = ("tcp", "udp")


class SpecError(BadInput):
    """A mapping spec that cannot be parsed; the message names the offending part."""


@dataclasses.dataclass(frozen=True)
class Mapping:
    """One published port range: traffic to host_ip:host_ports goes to target_ip:target_ports.

    ``host_ip`` is None when the spec names no host address ("all addresses", as in
    Docker). Ports are stored as inclusive ranges; a single port has start == end.
    """

    proto: Protocol
    host_ip: IPAddress | None
    host_port: int
    host_port_end: int
    target_ip: IPAddress
    target_port: int
    target_port_end: int

    @property
    def family(self) -> int:
        """IP version of the target (4 or 6)."""
        return self.target_ip.version

    @property
    def port_count(self) -> int:
        return self.host_port_end - self.host_port + 1

    def port_pairs(self) -> Iterator[tuple[int, int]]:
        """Yield (host_port, target_port) for every port of the range."""
        offset = self.target_port - self.host_port
        for port in range(self.host_port, self.host_port_end + 1):
            yield port, port + offset

    def listen_ip(self) -> IPAddress:
        """The address a userland listener binds.

        With no host address, an IPv4 target listens on 0.0.0.0 and an IPv6 target on
        ``::`` (IPv6 only), so ``9090:10.0.0.2:80`` and ``9090:[fd00::2]:80`` can both be
        published, as Docker publishes a port for each family.  An explicit ``[::]`` host
        is dual-stack, as Go's listener (and so docker-proxy's) is.
        """
        if self.host_ip is not None:
            return self.host_ip
        if self.family == 4:
            return ipaddress.IPv4Address("0.0.0.0")
        return ipaddress.IPv6Address("::")

    @property
    def dual_stack(self) -> bool:
        """True when the listener takes IPv4 and IPv6 clients (an explicit ``[::]`` host)."""
        return self.host_ip is not None and self.host_ip.version == 6 and self.host_ip.is_unspecified

    def __str__(self) -> str:
        return format_spec(self)

    def sort_key(self) -> tuple[Any, ...]:
        """A total order for listings and the state file. Mappings are deliberately not
        orderable themselves: a wildcard host (None) and an address, or an IPv4 and an
        IPv6 target, do not compare."""
        host = (0, 0, 0) if self.host_ip is None else (1, self.host_ip.version, int(self.host_ip))
        return (self.proto, self.host_port, host, self.target_ip.version, int(self.target_ip), self.target_port)


def _format_ip(ip: IPAddress) -> str:
    return f"[{ip}]" if ip.version == 6 else str(ip)


def _format_ports(start: int, end: int) -> str:
    return str(start) if start == end else f"{start}-{end}"


def format_spec(m: Mapping) -> str:
    """The canonical spec of a mapping; ``parse_spec(format_spec(m)) == m``."""
    host = f"{_format_ip(m.host_ip)}:" if m.host_ip is not None else ""
    return (
        f"{host}{_format_ports(m.host_port, m.host_port_end)}:"
        f"{_format_ip(m.target_ip)}:{_format_ports(m.target_port, m.target_port_end)}/{m.proto}"
    )


def format_endpoint(ip: IPAddress, port: int, port_end: int | None = None) -> str:
    """``1.2.3.4:80``, ``[::1]:80``, or with a range ``1.2.3.4:80-90``."""
    return f"{_format_ip(ip)}:{_format_ports(port, port if port_end is None else port_end)}"


def _split_fields(text: str, spec: str) -> list[str]:
    """Split on ':' outside brackets; bracketed parts keep their brackets."""
    fields: list[str] = []
    i = 0
    n = len(text)
    while True:
        if i < n and text[i] == "[":
            close = text.find("]", i)
            if close < 0:
                raise SpecError(f"bad mapping {shorten(spec)}: unclosed '[' in {shorten(text[i:])}")
            field = text[i : close + 1]
            i = close + 1
            if i < n and text[i] != ":":
                raise SpecError(f"bad mapping {shorten(spec)}: unexpected {shorten(text[i:])} after {shorten(field)}")
        else:
            colon = text.find(":", i)
            end = n if colon < 0 else colon
            field = text[i:end]
            i = end
        fields.append(field)
        if i >= n:
            return fields
        i += 1  # skip ':'
        if i >= n:
            fields.append("")
            return fields


def _parse_ip(field: str, what: str, spec: str) -> IPAddress:
    if not field:
        raise SpecError(f"bad mapping {shorten(spec)}: {what} is empty")
    if field.startswith("["):
        inner = field[1:-1]
        try:
            return ipaddress.IPv6Address(inner)
        except ValueError:
            raise SpecError(f"bad mapping {shorten(spec)}: {what} {shorten(field)} is not an IPv6 address") from None
    if ":" in field:
        raise SpecError(f"bad mapping {shorten(spec)}: {what} {shorten(field)} must be in brackets")
    try:
        return ipaddress.IPv4Address(field)
    except ValueError:
        raise SpecError(f"bad mapping {shorten(spec)}: {what} {shorten(field)} is not an IP address") from None


def _parse_port(text: str, what: str, spec: str) -> int:
    if not text:
        raise SpecError(f"bad mapping {shorten(spec)}: {what} is empty")
    if not (text.isascii() and text.isdigit()):
        raise SpecError(f"bad mapping {shorten(spec)}: {what} {shorten(text)} is not a number")
    if len(text) > 5 or not 1 <= int(text) <= 65535:
        raise SpecError(f"bad mapping {shorten(spec)}: {what} {shorten(text)} is out of range 1-65535")
    return int(text)


def _parse_range(field: str, what: str, spec: str) -> tuple[int, int]:
    if not field:
        raise SpecError(f"bad mapping {shorten(spec)}: {what} is empty")
    start_text, dash, end_text = field.partition("-")
    start = _parse_port(start_text, what, spec)
    if not dash:
        return start, start
    end = _parse_port(end_text, f"{what} range end", spec)
    if end < start:
        raise SpecError(f"bad mapping {shorten(spec)}: {what} range {shorten(field)} ends before it starts")
    return start, end


def parse_spec(spec: str) -> Mapping:
    """Parse one mapping spec; raise :class:`SpecError` naming the bad part."""
    if not isinstance(spec, str):
        raise SpecError(f"bad mapping {shorten(spec)}: not a string")
    text = spec.strip()
    if not text:
        raise SpecError("bad mapping '': empty spec")
    proto: str = "tcp"
    # The protocol suffix follows the last '/', which can never appear in an address.
    if "/" in text:
        text, _, proto = text.rpartition("/")
        if proto.lower() not in PROTOCOLS:
            raise SpecError(f"bad mapping {shorten(spec)}: unknown protocol {shorten(proto)} (use tcp or udp)")
        proto = proto.lower()
    fields = _split_fields(text, spec)
    if len(fields) == 3:
        host_field: str | None = None
        host_ports, target_field, target_ports = fields
    elif len(fields) == 4:
        host_field, host_ports, target_field, target_ports = fields
    else:
        raise SpecError(
            f"bad mapping {shorten(spec)}: expected [HOST_IP:]HOST_PORT:TARGET_IP:TARGET_PORT[/PROTO], "
            f"got {len(fields)} ':'-separated parts"
        )
    host_ip = _parse_ip(host_field, "host address", spec) if host_field is not None else None
    target_ip = _parse_ip(target_field, "target address", spec)
    h_start, h_end = _parse_range(host_ports, "host port", spec)
    t_start, t_end = _parse_range(target_ports, "target port", spec)
    if h_end - h_start != t_end - t_start:
        raise SpecError(
            f"bad mapping {shorten(spec)}: host range {shorten(host_ports)} and target range {shorten(target_ports)} "
            "differ in length"
        )
    if target_ip.is_unspecified:
        raise SpecError(f"bad mapping {shorten(spec)}: target address {shorten(target_field)} is unspecified")
    if target_ip.is_multicast or (target_ip.version == 4 and target_ip == ipaddress.IPv4Address("255.255.255.255")):
        raise SpecError(f"bad mapping {shorten(spec)}: target address {shorten(target_field)} is not a unicast address")
    if host_ip is not None and host_ip.is_multicast:
        raise SpecError(f"bad mapping {shorten(spec)}: host address {shorten(host_field)} is a multicast address")
    return Mapping(proto, host_ip, h_start, h_end, target_ip, t_start, t_end)  # type: ignore[arg-type]


def parse_specs(specs: list[str]) -> list[Mapping]:
    """Parse several specs and reject two mappings that would listen on the same port."""
    mappings = [parse_spec(s) for s in specs]
    check_no_overlap(mappings)
    return mappings


def _listen_key_overlaps(a: Mapping, b: Mapping) -> bool:
    if a.proto != b.proto:
        return False
    if a.host_port_end < b.host_port or b.host_port_end < a.host_port:
        return False
    ha, hb = a.listen_ip(), b.listen_ip()
    if ha == hb:
        return True
    # A wildcard overlaps every address of its family, and a dual-stack one every address.
    if ha.is_unspecified and (ha.version == hb.version or a.dual_stack):
        return True
    if hb.is_unspecified and (hb.version == ha.version or b.dual_stack):
        return True
    return False


def check_no_overlap(mappings: list[Mapping]) -> None:
    """Raise SpecError if two mappings claim the same protocol, address and port."""
    for i, a in enumerate(mappings):
        for b in mappings[i + 1 :]:
            if _listen_key_overlaps(a, b):
                raise SpecError(f"mappings {a} and {b} overlap on the host side")
