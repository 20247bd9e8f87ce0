"""Pure builders for transparent mode's routing: nft JSON and pyroute2 arguments, no I/O.

The proxy's upstream socket is bound to the *client's* address (IP_TRANSPARENT), so
the target's replies are addressed to the client and the host would forward them
to it. Three pieces make the host deliver them to the proxy's socket instead::

    table inet portproxy_transparent
        chain prerouting { type filter hook prerouting priority mangle (-150)
            ct direction reply  socket transparent 1  meta mark set meta mark & ~MASK | MARK }
    ip rule   fwmark MARK/MASK lookup TABLE   (priority PRIORITY; IPv4 and IPv6)
    ip route  local 0.0.0.0/0 dev lo table TABLE   (and local ::/0)

``socket transparent 1`` matches a packet for which a local socket with
IP_TRANSPARENT exists (the socket lookup finds the connecting or connected upstream
socket by its 4-tuple), so only replies to the proxy's spoofed connections are marked;
the mark selects a table whose only route says "every address is local". The
upstream connection is the one the proxy opened, so its replies are conntrack's
*reply* direction: ``ct direction reply`` first spares the socket lookup to every
packet in the original direction (half of all traffic through the host, including
the clients' own packets to the proxy).

Why a table of its own and not ``inet portproxy``: the kernel path rewrites that table
wholesale (``install`` replaces it in one batch, ``teardown`` deletes it), on its own
schedule; the marking rule must live exactly as long as a transparent mapping does,
whatever the kernel path does meanwhile. Its own name also makes it safe to replace
or delete as a whole: nothing of another program is in it.

The mark and mask (default 0x1d000000/0xff000000: the top byte, which
kube-proxy's 0x4000/0x8000, Docker's and Cilium's low bits leave alone) and the table
(7719) and rule priority are options, for hosts where they would clash.
"""

from __future__ import annotations

import dataclasses
import socket
from typing import Any

from .builders import FAMILY, Json, _ct, _match, _meta

NFT_TABLE = "portproxy_transparent"
CHAIN = "prerouting"
PRIO_MANGLE = -150


@dataclasses.dataclass(frozen=True)
class TransparentOptions:
    mark: int = 0x1D000000
    mask: int = 0xFF000000
    """Only these bits of the packet mark are set (and matched by the ip rule)."""
    table: int = 7719
    """Routing table holding the ``local`` default routes; must be used by nobody else."""
    priority: int = 7719
    """Priority of the ``ip rule``: before the main table's (32766)."""
    nft_table: str = NFT_TABLE

    def check(self) -> str | None:
        """Why these values cannot be used, or None."""
        if not 0 < self.mask <= 0xFFFFFFFF:
            return f"transparent mark mask {self.mask:#x} must be a non-zero 32-bit value"
        if self.mark & ~self.mask or not self.mark:
            return f"transparent mark {self.mark:#x} must be non-zero and inside its mask {self.mask:#x}"
        if not 0 < self.table < 0xFFFFFFFF or self.table in (253, 254, 255):
            return f"routing table {self.table} is reserved or out of range (use 1-252 or 256 and up)"
        if not 0 < self.priority < 32766:
            return f"ip rule priority {self.priority} must be between 1 and 32765 (before the main table)"
        return None


def _table(opts: TransparentOptions) -> Json:
    return {"family": FAMILY, "name": opts.nft_table}


def mark_value(opts: TransparentOptions) -> Any:
    """``meta mark & ~MASK | MARK``: keep the bits other programs set; just MARK for a full mask."""
    if opts.mask == 0xFFFFFFFF:
        return opts.mark
    return {"|": [{"&": [_meta("mark"), ~opts.mask & 0xFFFFFFFF]}, opts.mark]}


def install_commands(opts: TransparentOptions) -> list[Json]:
    """One batch that (re)creates the table with exactly the marking rule (add + delete +
    add: the table is replaced whether or not it existed)."""
    table = _table(opts)
    return [
        {"add": {"table": table}},
        {"delete": {"table": table}},
        {"add": {"table": table}},
        {"add": {"chain": {"family": FAMILY, "table": opts.nft_table, "name": CHAIN, "type": "filter", "hook": "prerouting",
                           "prio": PRIO_MANGLE, "policy": "accept"}}},
        {"add": {"rule": {"family": FAMILY, "table": opts.nft_table, "chain": CHAIN, "expr": [
            _match(_ct("direction"), "reply"),
            _match({"socket": {"key": "transparent"}}, 1),
            {"mangle": {"key": _meta("mark"), "value": mark_value(opts)}},
        ]}}},
    ]


def delete_commands(opts: TransparentOptions) -> list[Json]:
    return [{"delete": {"table": _table(opts)}}]


# --- policy routing (pyroute2 keyword arguments) ----------------------------------------------

FAMILIES = (socket.AF_INET, socket.AF_INET6)
RTN_LOCAL = 2
RT_SCOPE_HOST = 254


def rule_args(opts: TransparentOptions, family: int) -> dict[str, Any]:
    """``ip rule add fwmark MARK/MASK lookup TABLE priority PRIORITY`` for ``IPRoute.rule``."""
    return {"family": family, "table": opts.table, "priority": opts.priority, "fwmark": opts.mark,
            "fwmask": opts.mask, "action": "FR_ACT_TO_TBL"}


def route_args(opts: TransparentOptions, family: int, lo_index: int) -> dict[str, Any]:
    """``ip route add local 0.0.0.0/0 (::/0) dev lo table TABLE`` for ``IPRoute.route``."""
    return {"family": family, "dst": "0.0.0.0" if family == socket.AF_INET else "::", "dst_len": 0,
            "type": RTN_LOCAL, "scope": RT_SCOPE_HOST, "table": opts.table, "oif": lo_index}


def rule_is_ours(rule: dict[str, Any], opts: TransparentOptions) -> bool:
    """Is this dumped rule (pyroute2 message as a dict of plain values) exactly ours?"""
    return (rule.get("table") == opts.table and rule.get("priority") == opts.priority
            and rule.get("fwmark") == opts.mark and rule.get("fwmask") == opts.mask
            and not rule.get("src_len") and not rule.get("dst_len") and not rule.get("iifname")
            and not rule.get("oifname"))


def route_is_ours(route: dict[str, Any], lo_index: int) -> bool:
    """Is this dumped route (of our table) the ``local`` default via lo we add?"""
    return route.get("type") == RTN_LOCAL and route.get("dst_len") == 0 and route.get("oif") == lo_index


# --- rules that would take the marked replies before ours -----------------------------------------

FR_ACT_TO_TBL, FR_ACT_GOTO, FR_ACT_NOP = 1, 2, 3
FR_ACT_BLACKHOLE, FR_ACT_UNREACHABLE, FR_ACT_PROHIBIT = 6, 7, 8
FIB_RULE_INVERT = 0x2
RT_TABLE_LOCAL = 255
TABLE_NAMES = {253: "default", 254: "main", 255: "local"}
ACTION_NAMES = {FR_ACT_NOP: "nop", FR_ACT_BLACKHOLE: "blackhole", FR_ACT_UNREACHABLE: "unreachable",
                FR_ACT_PROHIBIT: "prohibit"}

ALL, SOME, NONE = "all", "some", "none"
"""How many of the marked replies a selector (or a whole rule) matches."""

_NARROWING = ("src_len", "dst_len", "tos", "ip_proto", "sport_range", "dport_range", "uid_range", "l3mdev")
"""Selectors that match some replies and not others (by address, port, protocol...)."""


def _fwmark_match(rule: dict[str, Any], opts: TransparentOptions) -> str:
    """The marked replies carry MARK under MASK (bits other programs set are theirs to
    route): does ``fwmark M/K`` match MARK?"""
    mark = rule.get("fwmark") or 0
    mask = rule.get("fwmask")
    if mask is None:
        mask = 0xFFFFFFFF if mark else 0
    return ALL if opts.mark & mask == mark & mask else NONE


def rule_matches_replies(rule: dict[str, Any], opts: TransparentOptions) -> str:
    """ALL, SOME or NONE: how many marked replies (packets from a target to a client,
    arriving from outside, marked MARK by the marking rule) a dumped rule's selectors match."""
    parts = [_fwmark_match(rule, opts)]
    iif = rule.get("iifname")
    if iif:
        parts.append(NONE if iif == "lo" else SOME)  # a reply arrives from the target's link, never from lo
    if rule.get("oifname"):
        parts.append(NONE)  # input route lookups have no output interface to match
    parts += [SOME for key in _NARROWING if rule.get(key)]
    result = NONE if NONE in parts else ALL if all(p == ALL for p in parts) else SOME
    if rule.get("flags", 0) & FIB_RULE_INVERT:
        result = {ALL: NONE, NONE: ALL, SOME: SOME}[result]
    return result


def rule_takes_replies(rule: dict[str, Any], opts: TransparentOptions, tables_with_routes: set[int]) -> bool:
    """Would this rule, evaluated before ours, decide where some marked replies go?

    A ``lookup`` only decides for packets its table has a route for: the local table (local
    addresses only; a reply goes to a client) and an empty table let them fall through to
    the next rule. A ``goto`` past ours skips it; blackhole, unreachable and prohibit drop."""
    if rule_matches_replies(rule, opts) == NONE:
        return False
    action = rule.get("action", FR_ACT_TO_TBL)
    if action == FR_ACT_TO_TBL:
        table = rule.get("table")
        return table not in (RT_TABLE_LOCAL, opts.table) and table in tables_with_routes
    if action == FR_ACT_GOTO:
        return (rule.get("goto") or 0) > opts.priority
    return action != FR_ACT_NOP


def describe_rule(rule: dict[str, Any]) -> str:
    """The rule as ``ip rule`` prints it (the parts this check reads)."""
    words = [f"{rule.get('priority', 0)}:"]
    if rule.get("flags", 0) & FIB_RULE_INVERT:
        words.append("not")
    words += ["from", f"{rule['src']}/{rule['src_len']}" if rule.get("src_len") else "all"]
    if rule.get("dst_len"):
        words += ["to", f"{rule.get('dst')}/{rule['dst_len']}"]
    if rule.get("fwmark") or rule.get("fwmask"):
        mask = rule.get("fwmask")
        words += ["fwmark", f"{rule.get('fwmark') or 0:#x}" + (f"/{mask:#x}" if mask not in (None, 0xFFFFFFFF) else "")]
    for key, word in (("iifname", "iif"), ("oifname", "oif"), ("ip_proto", "ipproto")):
        if rule.get(key):
            words += [word, str(rule[key])]
    action = rule.get("action", FR_ACT_TO_TBL)
    if action == FR_ACT_TO_TBL:
        table = rule.get("table")
        words += ["lookup", TABLE_NAMES.get(table, str(table))]  # type: ignore[arg-type]
    elif action == FR_ACT_GOTO:
        words += ["goto", str(rule.get("goto"))]
    else:
        words.append(ACTION_NAMES.get(action, f"action {action}"))
    return " ".join(words)


def shadowing_rule(rules: list[dict[str, Any]], opts: TransparentOptions, tables_with_routes: set[int],
                   family: str = "IPv4") -> str | None:
    """Why the marked replies would not reach transparent mode's rule, or None.

    ``rules``: one family's dump, in the kernel's order (the order rules are evaluated in).
    Every rule up to ours is checked; without ours (before install), every rule with a
    priority up to ours', since a new rule goes after those of its own priority."""
    for rule in rules:
        if rule_is_ours(rule, opts):
            return None
        if (rule.get("priority") or 0) > opts.priority:
            return None
        if rule_takes_replies(rule, opts, tables_with_routes):
            return (f"{family} ip rule '{describe_rule(rule)}' comes before transparent mode's (priority "
                    f"{opts.priority}) and would take its marked replies, so every connection would time out; "
                    f"delete it or move it after priority {opts.priority}")
    return None
