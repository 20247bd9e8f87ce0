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
WILDCARDS: dict[int, IPAddress] = {4: ipaddress.IPv4Address("0.0.0.0"), 6: ipaddress.IPv6Address("::")}
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
        """The address a userland listener of this mapping binds (for one of
        :meth:`per_family`'s mappings: its own host address)."""
        if self.host_ip is not None:
            return self.host_ip
        return WILDCARDS[self.family]

    def per_family(self) -> list["Part"]:
        """The mapping once per address family it publishes on, each with its host address.

        As Docker's ``-p`` does: no host address publishes on IPv4 (``0.0.0.0``) *and* on
        IPv6 (``[::]``, an IPv6-only socket), whatever the target's family; ``0.0.0.0:``
        is IPv4 only, ``[::]:`` IPv6 only. A family other than the target's can only be
        proxied (nftables has no NAT64), so that part of a mapping always runs on the
        userland path (see :attr:`translatable`)."""
        if self.host_ip is not None:
            return [self]
        return [dataclasses.replace(self, host_ip=WILDCARDS[4]), dataclasses.replace(self, host_ip=WILDCARDS[6])]

    @property
    def translatable(self) -> bool:
        """Whether DNAT can serve it: the host address (if any) has the target's family."""
        return self.host_ip is None or self.host_ip.version == self.family

    def listen_label(self) -> str:
        """``0.0.0.0:9090``, ``[::1]:9090``, or ``*:9090`` for every address of both families."""
        ports = _format_ports(self.host_port, self.host_port_end)
        return f"*:{ports}" if self.host_ip is None else format_endpoint(self.host_ip, self.host_port,
                                                                           self.host_port_end)

    def __str__(self) -> str:
        return format_spec(self)

    def sort_key(self) -> tuple[Any, ...]:
        """A total order for listings and the state file. Mappings are deliberately not
        orderable themselves: a wildcard host (None) and an address, or an IPv4 and an
        IPv6 target, do not compare."""
        host = (0, 0, 0) if self.host_ip is None else (1, self.host_ip.version, int(self.host_ip))
        return (self.proto, self.host_port, host, self.target_ip.version, int(self.target_ip), self.target_port)


Part = Mapping
"""One address family of a mapping, with its own host address: what :meth:`Mapping.per_family`
returns. The unit the userland proxy listens on and the kernel path installs (a mapping
without a host address is two parts, ``0.0.0.0`` and ``[::]``); the same class, named for
what a function takes or returns."""

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
    for ip, what, field in ((host_ip, "host", host_field), (target_ip, "target", target_field)):
        if ip is not None and (why := ipv4_mapped_problem(ip)):
            raise SpecError(f"bad mapping {shorten(spec)}: {what} address {shorten(field)} {why}")
    if host_ip is not None and host_ip.is_multicast:
        raise SpecError(f"bad mapping {shorten(spec)}: host address {shorten(host_field)} is a multicast address")
    return Mapping(proto, host_ip, h_start, h_end, target_ip, t_start, t_end)  # type: ignore[arg-type]


def ipv4_mapped_problem(ip: IPAddress) -> str | None:
    """Why ``ip`` is refused if it is an IPv4-mapped IPv6 address (``::ffff:192.0.2.1``), else None.

    It names an IPv4 host in IPv6 notation, so the mapping's family would be ambiguous; every
    place that takes an address from a user (specs, the CNI plugin's ``hostIP``) refuses it
    with the plain IPv4 form to write instead."""
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return f"is an IPv4-mapped IPv6 address; write {ip.ipv4_mapped}"
    return None


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
    for pa in a.per_family():
        for pb in b.per_family():
            ha, hb = pa.listen_ip(), pb.listen_ip()
            # A wildcard overlaps every address of its family.
            if ha.version == hb.version and (ha == hb or ha.is_unspecified or hb.is_unspecified):
                return True
    return False


def check_no_overlap(mappings: list[Mapping]) -> None:
    """Raise SpecError if two mappings claim the same protocol, address and port.

    Sorted by protocol and first port, each mapping is compared only with those that
    start within its own ports: O(n log n) for the usual scattered ports, where comparing
    every pair took 50 ms at 1,000 mappings and seconds at 10,000. A pair is named in
    the order given."""
    order = sorted(range(len(mappings)), key=lambda i: (mappings[i].proto, mappings[i].host_port, i))
    for pos, i in enumerate(order):
        first = mappings[i]
        for k in range(pos + 1, len(order)):
            j = order[k]
            other = mappings[j]
            if other.proto != first.proto or other.host_port > first.host_port_end:
                break
            a, b = (first, other) if i < j else (other, first)
            if _listen_key_overlaps(a, b):
                hint = ""
                if (a.host_ip is None or b.host_ip is None) and a.family != b.family:
                    hint = (" (with no host address a mapping publishes on IPv4 and IPv6: give each its "
                            "family, 0.0.0.0:... and [::]:...)")
                raise SpecError(f"mappings {a} and {b} overlap on the host side{hint}")
