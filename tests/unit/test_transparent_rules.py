"""Which ip rules would take transparent mode's marked replies before its own rule (pure, no root)."""

from __future__ import annotations

import pytest

from portproxy.kernel.transparent_rules import (ALL, NONE, SOME, TransparentOptions, describe_rule,
                                                rule_matches_replies, rule_takes_replies, shadowing_rule)

OPTS = TransparentOptions()  # fwmark 0x1d000000/0xff000000, table 7719, priority 7719
BLANK = {"priority": 0, "table": 254, "fwmark": None, "fwmask": None, "src": None, "src_len": 0, "dst": None,
         "dst_len": 0, "iifname": None, "oifname": None, "action": 1, "flags": 0, "goto": None, "tos": 0,
         "ip_proto": None, "sport_range": None, "dport_range": None, "uid_range": None, "l3mdev": None}


def rule(**fields) -> dict:
    return {**BLANK, **fields}


LOCAL = rule(priority=0, table=255)
MAIN = rule(priority=32766, table=254)
DEFAULT = rule(priority=32767, table=253)
OURS = rule(priority=7719, table=7719, fwmark=0x1D000000, fwmask=0xFF000000)
STOCK = [LOCAL, MAIN, DEFAULT]
ROUTED = {254, 255, 100}  # tables that hold routes (253 is empty, as on most hosts)


@pytest.mark.parametrize("fields, expected", [
    ({}, ALL),
    ({"fwmark": 0x1D000000, "fwmask": 0xFF000000}, ALL),
    ({"fwmark": 0x1D000000}, ALL),  # no mask dumped: the whole mark
    ({"fwmark": 0x0D000000, "fwmask": 0x0F000000}, ALL),  # overlapping mask that agrees
    ({"fwmark": 0x02000000, "fwmask": 0x0F000000}, NONE),  # overlapping mask that disagrees
    ({"fwmark": 0x80000, "fwmask": 0xFF0000}, NONE),  # another program's bits (Tailscale's)
    ({"fwmark": 0, "fwmask": 0xFF}, ALL),  # "not marked by X": our replies are not
    ({"iifname": "lo"}, NONE),
    ({"iifname": "br0"}, SOME),
    ({"oifname": "eth0"}, NONE),
    ({"src": "10.0.0.0", "src_len": 8}, SOME),
    ({"dst": "10.0.0.0", "dst_len": 8}, SOME),
    ({"ip_proto": 6}, SOME),
    ({"dport_range": (80, 80)}, SOME),
    ({"fwmark": 0x1D000000, "fwmask": 0xFF000000, "src_len": 8, "src": "10.0.0.0"}, SOME),
    ({"fwmark": 0x80000, "fwmask": 0xFF0000, "src_len": 8, "src": "10.0.0.0"}, NONE),
    ({"flags": 2}, NONE),  # "not from all": matches nothing
    ({"flags": 2, "fwmark": 0xCA6C}, ALL),  # wg-quick's "not fwmark 0xca6c"
    ({"flags": 2, "fwmark": 0x1D000000, "fwmask": 0xFF000000}, NONE),
    ({"flags": 2, "iifname": "br0"}, SOME),
])
def test_which_replies_a_rule_matches(fields: dict, expected: str) -> None:
    assert rule_matches_replies(rule(**fields), OPTS) == expected


@pytest.mark.parametrize("fields, takes", [
    ({"table": 254}, True),  # lookup main: it routes the client's address
    ({"table": 100}, True),
    ({"table": 255}, False),  # the local table: a reply is not addressed to this host
    ({"table": 253}, False),  # an empty table: the lookup falls through
    ({"table": 7719}, False),  # our own table: the conflict check's business
    ({"action": 6, "table": 0}, True),  # blackhole
    ({"action": 7, "table": 0}, True),  # unreachable
    ({"action": 8, "table": 0}, True),  # prohibit
    ({"action": 3, "table": 0}, False),  # nop
    ({"action": 2, "table": 0, "goto": 9000}, True),  # jumps past ours
    ({"action": 2, "table": 0, "goto": 500}, False),  # lands before ours: ours is still evaluated
    ({"table": 254, "iifname": "lo"}, False),
    ({"table": 254, "fwmark": 0x4000, "fwmask": 0x4000}, False),  # kube-proxy's bit
])
def test_which_rules_take_the_replies(fields: dict, takes: bool) -> None:
    assert rule_takes_replies(rule(priority=100, **fields), OPTS, ROUTED) is takes


@pytest.mark.parametrize("rules, found", [
    (STOCK, None),
    ([LOCAL, OURS, MAIN, DEFAULT], None),
    ([LOCAL, rule(priority=100, fwmark=0x1D000000, fwmask=0xFF000000), MAIN, DEFAULT], "100:"),
    ([LOCAL, rule(priority=100, fwmark=0x1D000000, fwmask=0xFF000000), OURS, MAIN, DEFAULT], "100:"),
    # After ours (in the kernel's order), a rule cannot take what ours already routed.
    ([LOCAL, OURS, rule(priority=7719, table=254), MAIN, DEFAULT], None),
    # Before install, a rule of our own priority is evaluated first: a new rule goes after it.
    ([LOCAL, rule(priority=7719, table=254), MAIN, DEFAULT], "7719:"),
    ([LOCAL, rule(priority=7720, table=254), MAIN, DEFAULT], None),
    # Tailscale's rules: its own mark, and a catch-all lookup of a table that routes.
    ([LOCAL, rule(priority=5210, fwmark=0x80000, fwmask=0xFF0000), rule(priority=5270, table=52), MAIN], None),
    ([LOCAL, rule(priority=5270, table=100), MAIN], "5270:"),
])
def test_the_first_shadowing_rule_is_named(rules: list[dict], found: str | None) -> None:
    reason = shadowing_rule(rules, OPTS, ROUTED)
    if found is None:
        assert reason is None
    else:
        assert reason is not None and f"'{found}" in reason and "priority 7719" in reason


def test_the_reason_is_one_line_in_ip_rule_words() -> None:
    reason = shadowing_rule([LOCAL, rule(priority=100, fwmark=0x1D000000, fwmask=0xFF000000)], OPTS, ROUTED, "IPv4")
    assert reason == ("IPv4 ip rule '100: from all fwmark 0x1d000000/0xff000000 lookup main' comes before "
                      "transparent mode's (priority 7719) and would take its marked replies, so every connection "
                      "would time out; delete it or move it after priority 7719")


@pytest.mark.parametrize("fields, text", [
    ({"priority": 5, "src": "10.1.0.0", "src_len": 16, "table": 100}, "5: from 10.1.0.0/16 lookup 100"),
    ({"priority": 6, "flags": 2, "fwmark": 0xCA6C, "table": 51820}, "6: not from all fwmark 0xca6c lookup 51820"),
    ({"priority": 7, "iifname": "br0", "action": 7, "table": 0}, "7: from all iif br0 unreachable"),
    ({"priority": 8, "action": 2, "goto": 9000, "table": 0}, "8: from all goto 9000"),
])
def test_describe_rule(fields: dict, text: str) -> None:
    assert describe_rule(rule(**fields)) == text
