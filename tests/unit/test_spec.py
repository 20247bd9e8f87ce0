"""The mapping grammar: accepted forms, rejected forms with the offending part named, fuzzing."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portproxy.spec import Mapping, SpecError, format_spec, parse_spec, parse_specs

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("9090:172.16.1.1:8080", Mapping("tcp", None, 9090, 9090, V4("172.16.1.1"), 8080, 8080)),
        ("9090:172.16.1.1:8080/tcp", Mapping("tcp", None, 9090, 9090, V4("172.16.1.1"), 8080, 8080)),
        ("53:10.0.0.2:5353/udp", Mapping("udp", None, 53, 53, V4("10.0.0.2"), 5353, 5353)),
        ("53:10.0.0.2:5353/UDP", Mapping("udp", None, 53, 53, V4("10.0.0.2"), 5353, 5353)),
        ("127.0.0.1:80:10.0.0.2:8080", Mapping("tcp", V4("127.0.0.1"), 80, 80, V4("10.0.0.2"), 8080, 8080)),
        ("8000-8010:10.0.0.2:9000-9010", Mapping("tcp", None, 8000, 8010, V4("10.0.0.2"), 9000, 9010)),
        ("[::]:9090:[fd00::2]:80", Mapping("tcp", V6("::"), 9090, 9090, V6("fd00::2"), 80, 80)),
        ("[::1]:1:[fd00::2]:65535/udp", Mapping("udp", V6("::1"), 1, 1, V6("fd00::2"), 65535, 65535)),
        ("0.0.0.0:9090:[fd00::2]:80", Mapping("tcp", V4("0.0.0.0"), 9090, 9090, V6("fd00::2"), 80, 80)),
        ("  9090:172.16.1.1:8080  ", Mapping("tcp", None, 9090, 9090, V4("172.16.1.1"), 8080, 8080)),
    ],
)
def test_accepts(spec: str, expected: Mapping) -> None:
    assert parse_spec(spec) == expected


@pytest.mark.parametrize(
    "spec, names",
    [
        ("", "empty"),
        ("9090", "parts"),
        ("9090:8080", "parts"),
        ("1.2.3.4:9090:10.0.0.1:80:90", "parts"),
        ("0:10.0.0.1:80", "host port '0'"),
        ("65536:10.0.0.1:80", "host port '65536'"),
        ("9090:10.0.0.1:0", "target port '0'"),
        ("9090:10.0.0.1:99999", "target port '99999'"),
        ("http:10.0.0.1:80", "host port 'http'"),
        ("9090:10.0.0.1:eighty", "target port 'eighty'"),
        ("-1:10.0.0.1:80", "host port"),
        ("9090:10.0.0.1:", "target port is empty"),
        (":10.0.0.1:80", "host port is empty"),
        ("9090::80", "target address is empty"),
        (":9090:10.0.0.1:80", "host address is empty"),
        ("9090:10.0.0.300:80", "target address '10.0.0.300'"),
        ("9090:example.com:80", "target address 'example.com'"),
        ("bad:9090:10.0.0.1:80", "host address 'bad'"),
        ("9090:fd00::2:80", "parts"),
        ("9090:[fd00::zz]:80", "target address '[fd00::zz]'"),
        ("9090:[10.0.0.1]:80", "target address '[10.0.0.1]'"),
        ("9090:[fd00::2:80", "unclosed"),
        ("9090:[fd00::2]x:80", "unexpected"),
        ("9090:10.0.0.1:80/sctp", "unknown protocol 'sctp'"),
        ("9090:10.0.0.1:80/", "unknown protocol ''"),
        ("8000-8010:10.0.0.1:9000-9005", "differ in length"),
        ("8000-8010:10.0.0.1:9000", "differ in length"),
        ("8010-8000:10.0.0.1:9010-9000", "ends before it starts"),
        ("8000-:10.0.0.1:9000", "host port range end is empty"),
        ("9090:0.0.0.0:80", "unspecified"),
        ("9090:[::]:80", "unspecified"),
        ("9090:224.0.0.1:80", "not a unicast"),
        ("9090:10.0.0.1:٣٣", "not a number"),
    ],
)
def test_rejects_naming_the_bad_part(spec: str, names: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    message = str(info.value)
    assert names in message
    assert "\n" not in message


@given(st.text(max_size=60))
@settings(max_examples=3000, deadline=None)
def test_fuzz_only_spec_errors(text: str) -> None:
    try:
        mapping = parse_spec(text)
    except SpecError:
        return
    assert parse_spec(format_spec(mapping)) == mapping


_spec_alphabet = st.sampled_from(list("0123456789:.[]/-abcdefpux ") + ["tcp", "udp", "::", "65535", "65536"])


@given(st.lists(_spec_alphabet, max_size=25).map("".join))
@settings(max_examples=3000, deadline=None)
def test_fuzz_spec_shaped_input(text: str) -> None:
    try:
        mapping = parse_spec(text)
    except SpecError:
        return
    assert 1 <= mapping.host_port <= mapping.host_port_end <= 65535
    assert mapping.port_count == mapping.target_port_end - mapping.target_port + 1
    assert parse_spec(format_spec(mapping)) == mapping


@given(
    st.one_of(st.none(), st.ip_addresses()),
    st.integers(1, 65535),
    st.integers(0, 20),
    st.ip_addresses(),
    st.integers(1, 65535),
    st.sampled_from(["tcp", "udp"]),
)
def test_round_trip(host, host_port, span, target, target_port, proto) -> None:
    if target.is_unspecified or target.is_multicast or target == V4("255.255.255.255"):
        return
    if host is not None and host.is_multicast:
        return
    if any(getattr(a, "ipv4_mapped", None) for a in (host, target)):
        return  # refused on purpose (test_ipv4_mapped_addresses_are_refused_with_the_plain_form)
    span = min(span, 65535 - host_port, 65535 - target_port)
    m = Mapping(proto, host, host_port, host_port + span, target, target_port, target_port + span)
    assert parse_spec(format_spec(m)) == m
    assert len(list(m.port_pairs())) == span + 1


def test_port_pairs_map_port_to_port() -> None:
    m = parse_spec("8000-8002:10.0.0.1:9000-9002")
    assert list(m.port_pairs()) == [(8000, 9000), (8001, 9001), (8002, 9002)]


def test_no_host_address_publishes_on_both_families() -> None:
    """Docker's -p: no host address is 0.0.0.0 and [::] (IPv6 only); each explicit one its own."""
    for target in ("10.0.0.1", "[fd00::1]"):
        parts = parse_spec(f"9090:{target}:80").per_family()
        assert [str(p.listen_ip()) for p in parts] == ["0.0.0.0", "::"]
        assert [p.translatable for p in parts] == ([True, False] if target[0] != "[" else [False, True])
    assert [str(p.listen_ip()) for p in parse_spec("0.0.0.0:9090:10.0.0.1:80").per_family()] == ["0.0.0.0"]
    assert [str(p.listen_ip()) for p in parse_spec("[::]:9090:10.0.0.1:80").per_family()] == ["::"]
    assert parse_spec("9090-9091:10.0.0.1:80-81").listen_label() == "*:9090-9091"
    assert parse_spec("[::1]:9090:10.0.0.1:80").listen_label() == "[::1]:9090"


@pytest.mark.parametrize(
    "specs, overlap",
    [
        (["9090:10.0.0.1:80", "9090:10.0.0.2:80"], True),
        (["9090:10.0.0.1:80", "9090:10.0.0.2:80/udp"], False),
        (["9090:10.0.0.1:80", "9090:[fd00::1]:80"], True),
        (["0.0.0.0:9090:10.0.0.1:80", "[::]:9090:[fd00::1]:80"], False),
        (["9090:10.0.0.1:80", "[::]:9090:[fd00::1]:80"], True),
        (["9090:10.0.0.1:80", "[::1]:9090:10.0.0.2:80"], True),
        (["0.0.0.0:9090:10.0.0.1:80", "[::1]:9090:10.0.0.2:80"], False),
        (["127.0.0.1:9090:10.0.0.1:80", "9090:10.0.0.2:80"], True),
        (["127.0.0.1:9090:10.0.0.1:80", "127.0.0.2:9090:10.0.0.2:80"], False),
        (["8000-8010:10.0.0.1:80-90", "8010:10.0.0.2:80"], True),
    ],
)
def test_overlapping_mappings(specs: list[str], overlap: bool) -> None:
    if overlap:
        with pytest.raises(SpecError, match="overlap"):
            parse_specs(specs)
    else:
        assert len(parse_specs(specs)) == 2


def test_ipv4_mapped_addresses_are_refused_with_the_plain_form() -> None:
    with pytest.raises(SpecError, match="IPv4-mapped IPv6 address; write 127.0.0.1"):
        parse_spec("[::ffff:127.0.0.1]:9090:10.0.0.1:80")
    with pytest.raises(SpecError, match="write 10.0.0.1"):
        parse_spec("9090:[::ffff:10.0.0.1]:80")
