"""Transparent mode's pure parts: fallback decisions, the nft and routing builders, option checks, ownership."""

from __future__ import annotations

import ipaddress

import pytest

from portproxy.kernel.transparent_rules import (
    TransparentOptions,
    delete_commands,
    install_commands,
    mark_value,
    route_is_ours,
    rule_is_ours,
)
from portproxy.proxy.source import fallback_reason


@pytest.mark.parametrize("client, target, reason, bound", [
    ("198.51.100.2", "172.16.1.1", None, "198.51.100.2"),
    ("::ffff:198.51.100.2", "172.16.1.1", None, "198.51.100.2"),
    ("fd00:198:51::2", "fd00:172:16::1", None, "fd00:198:51::2"),
    ("127.0.0.1", "172.16.1.1", "loopback", "127.0.0.1"),
    ("::ffff:127.0.0.1", "172.16.1.1", "loopback", "127.0.0.1"),
    ("::1", "fd00:172:16::1", "loopback", "::1"),
    ("fd00:198:51::2", "172.16.1.1", "family", "fd00:198:51::2"),
    ("198.51.100.2", "fd00:172:16::1", "family", "198.51.100.2"),
    ("172.16.1.1", "172.16.1.1", "hairpin", "172.16.1.1"),
])
def test_fallback_reason(client: str, target: str, reason: str | None, bound: str) -> None:
    assert fallback_reason(client, target) == (reason, bound)


def test_same_link_client_falls_back() -> None:
    links = (ipaddress.ip_network("172.16.0.0/16"), ipaddress.ip_network("fd00:172:16::/64"))
    assert fallback_reason("172.16.1.2", "172.16.1.1", links) == ("same_link", "172.16.1.2")
    assert fallback_reason("fd00:172:16::2", "fd00:172:16::1", links) == ("same_link", "fd00:172:16::2")
    assert fallback_reason("198.51.100.2", "172.16.1.1", links) == (None, "198.51.100.2")


def test_install_commands_replace_only_our_table() -> None:
    cmds = install_commands(TransparentOptions())
    tables = [c[verb]["table"] for c in cmds for verb in c if "table" in c[verb] and isinstance(c[verb]["table"], dict)]
    assert all(t == {"family": "inet", "name": "portproxy_transparent"} for t in tables)
    assert [next(iter(c)) for c in cmds] == ["add", "delete", "add", "add", "add"]
    rule = cmds[-1]["add"]["rule"]
    assert rule["expr"][0] == {"match": {"op": "==", "left": {"ct": {"key": "direction"}}, "right": "reply"}}
    assert rule["expr"][1] == {"match": {"op": "==", "left": {"socket": {"key": "transparent"}}, "right": 1}}
    assert rule["expr"][2]["mangle"]["value"] == {"|": [{"&": [{"meta": {"key": "mark"}}, 0x00FFFFFF]}, 0x1D000000]}
    assert delete_commands(TransparentOptions()) == [{"delete": {"table": {"family": "inet",
                                                                           "name": "portproxy_transparent"}}}]


def test_full_mask_sets_the_mark_alone() -> None:
    assert mark_value(TransparentOptions(mark=7, mask=0xFFFFFFFF)) == 7


@pytest.mark.parametrize("opts, word", [
    (TransparentOptions(mark=0x1, mask=0xFF000000), "inside its mask"),
    (TransparentOptions(mark=0), "non-zero"),
    (TransparentOptions(table=254), "reserved"),
    (TransparentOptions(priority=32766), "priority"),
])
def test_option_checks(opts: TransparentOptions, word: str) -> None:
    problem = opts.check()
    assert problem is not None and word in problem


def test_ownership_is_exact() -> None:
    opts = TransparentOptions()
    ours = {"table": 7719, "priority": 7719, "fwmark": 0x1D000000, "fwmask": 0xFF000000, "src_len": 0, "dst_len": 0}
    assert rule_is_ours(ours, opts)
    assert not rule_is_ours({**ours, "fwmark": 0x1E000000}, opts)
    assert not rule_is_ours({**ours, "src_len": 24}, opts)
    assert route_is_ours({"type": 2, "dst_len": 0, "oif": 1}, 1)
    assert not route_is_ours({"type": 1, "dst_len": 0, "oif": 1}, 1)
