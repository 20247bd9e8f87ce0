"""PROXY protocol encoder: byte-exact headers per HAProxy's proxy-protocol.txt (no root needed).

The round-trip tests parse what the encoder writes with a small parser written
from the specification here, independently of the encoder.
"""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given, strategies as st

from portproxy.proxy import proxy_protocol as pp

SIG = bytes([0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A])


def test_v1_tcp4() -> None:
    assert pp.v1(("198.51.100.2", 40000), ("198.51.100.1", 9090)) == \
        b"PROXY TCP4 198.51.100.2 198.51.100.1 40000 9090\r\n"


def test_v1_tcp6_and_longest_line_fits() -> None:
    assert pp.v1(("fd00:198:51::2", 1), ("fd00:198:51::1", 65535)) == \
        b"PROXY TCP6 fd00:198:51::2 fd00:198:51::1 1 65535\r\n"
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    longest = pp.v1((full, 65535), (full, 65535))
    assert len(longest) == 104 <= pp.V1_MAX  # 107: the specification's worst case, "UNKNOWN" with addresses


def test_v1_mapped_ipv4_is_tcp4_and_unknown() -> None:
    assert pp.v1(("::ffff:198.51.100.2", 5), ("::ffff:198.51.100.1", 6)) == \
        b"PROXY TCP4 198.51.100.2 198.51.100.1 5 6\r\n"
    assert pp.v1_unknown() == b"PROXY UNKNOWN\r\n"


def test_v2_tcp4_bytes() -> None:
    header = pp.v2(("198.51.100.2", 40000), ("198.51.100.1", 9090))
    assert header == SIG + bytes([0x21, 0x11, 0x00, 0x0C]) + bytes([198, 51, 100, 2, 198, 51, 100, 1]) + \
        bytes([0x9C, 0x40, 0x23, 0x82])


def test_v2_tcp6_bytes() -> None:
    header = pp.v2(("fd00:198:51::2", 443), ("fd00:198:51::1", 9090))
    assert header[:16] == SIG + bytes([0x21, 0x21, 0x00, 0x24])
    assert header[16:32] == bytes.fromhex("fd000198005100000000000000000002")
    assert header[32:48] == bytes.fromhex("fd000198005100000000000000000001")
    assert header[48:] == bytes([0x01, 0xBB, 0x23, 0x82])


def test_v2_local() -> None:
    assert pp.v2_local() == SIG + bytes([0x20, 0x00, 0x00, 0x00])


def test_mixed_families_refused() -> None:
    try:
        pp.v1(("198.51.100.2", 1), ("fd00::1", 2))
    except pp.ProxyProtocolError:
        return
    raise AssertionError("mixed families were encoded")


# --- an independent parser (tests only) -------------------------------------------------------

def parse(data: bytes) -> tuple[str, tuple[str, int] | None, tuple[str, int] | None, int]:
    """(protocol, source, destination, header length) of a v1 or v2 header at the start of ``data``."""
    if data.startswith(SIG):
        ver_cmd, fam, length = struct.unpack("!BBH", data[12:16])
        assert ver_cmd >> 4 == 2
        body = data[16:16 + length]
        if ver_cmd & 0xF == 0:
            return "LOCAL", None, None, 16 + length
        assert ver_cmd & 0xF == 1
        size = {0x11: 4, 0x21: 16}[fam]
        src = ipaddress.ip_address(body[:size])
        dst = ipaddress.ip_address(body[size:2 * size])
        sport, dport = struct.unpack("!HH", body[2 * size:2 * size + 4])
        return {0x11: "TCP4", 0x21: "TCP6"}[fam], (str(src), sport), (str(dst), dport), 16 + length
    end = data.index(b"\r\n")
    assert end + 2 <= pp.V1_MAX
    words = data[:end].decode("ascii").split(" ")
    assert words[0] == "PROXY"
    if words[1] == "UNKNOWN":
        return "UNKNOWN", None, None, end + 2
    assert len(words) == 6
    for port in words[4:]:
        assert port == str(int(port)) and 0 <= int(port) <= 65535  # no leading zeros
    return words[1], (words[2], int(words[4])), (words[3], int(words[5])), end + 2


ports = st.integers(0, 65535)
v4 = st.ip_addresses(v=4).map(str)
v6 = st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None).map(str)


@given(st.one_of(st.tuples(v4, v4, st.just("TCP4")), st.tuples(v6, v6, st.just("TCP6"))), ports, ports,
       st.sampled_from(pp.VERSIONS), st.binary(max_size=64))
def test_round_trip(addrs: tuple[str, str, str], sport: int, dport: int, version: str, payload: bytes) -> None:
    src, dst, proto = addrs
    header = (pp.v1 if version == "v1" else pp.v2)((src, sport), (dst, dport))
    got_proto, got_src, got_dst, length = parse(header + payload)
    assert (got_proto, got_src, got_dst) == (proto, (src, sport), (dst, dport))
    assert (header + payload)[length:] == payload


def test_local_and_unknown_round_trip() -> None:
    assert parse(pp.v2_local() + b"x")[::3] == ("LOCAL", 16)
    assert parse(pp.v1_unknown())[0] == "UNKNOWN"
