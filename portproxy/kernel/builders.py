"""Pure builders: mappings in, libnftables JSON commands out. No I/O, no root needed.

Everything lives in one ``inet portproxy`` table (IPv4 and IPv6 together)::

    nat prerouting  (-100)  fib daddr type local → dispatch
    nat output      (-100)  fib daddr type local, not 127/8 unless route_localnet → dispatch
        dispatch: three verdict maps, O(1) for any number of mappings
            @dnat_any  nfproto . l4proto . dport          → jump <mapping chain>   (no host address)
            @dnat_ip4  ip daddr . l4proto . dport         → jump <mapping chain>   (IPv4 host address)
            @dnat_ip6  ip6 daddr . l4proto . dport        → jump <mapping chain>   (IPv6 host address)
        <mapping chain>: connection counter, hairpin mark, dnat (a port map for ranges)
    nat postrouting (100)   masquerade: hairpin-marked flows, host-originated DNAT'd flows,
                            and optionally a container subnet's egress (-s SUBNET ! -o BRIDGE)
    filter forward/input/output (-1): per-mapping packet and byte counters, found by the
                            mapping id the mapping chain stored in the flow's conntrack mark
                            (so both directions count), and ``ct status dnat accept`` in forward

nat chains see only a flow's first packet, so the counter in a mapping chain counts
connections; bytes are counted in the filter chains, which see every packet. The
flow is recognised there by its conntrack mark (bits 16-31 hold the mapping's id,
set with the dnat): nft 1.0.6 cannot put ``ct original proto-dst`` in a concatenated
map key, and the mark also tells apart mappings that share a target.

The JSON API (not nft text) carries user input, so nothing here is ever parsed as
nft syntax. nft 1.0.6 JSON cannot express concatenated map *values*, hence the
verdict-map → per-mapping-chain design instead of one ``dnat ... map``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any, Iterable

from ..spec import Mapping

TABLE = "portproxy"
FAMILY = "inet"
HAIRPIN_MARK = 0x00200000
"""Packet-mark bit set in a mapping chain when a target connects to its own published port."""
CT_MARK_SHIFT = 16
CT_MARK_MASK = 0xFFFF0000
"""Bits of the conntrack mark that carry the mapping id; the low 16 bits are left alone."""
MAX_MAPPING_ID = 0xFFFF

Json = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    route_localnet: bool = False
    """Also publish on 127.0.0.0/8 (needs net.ipv4.conf.all.route_localnet=1)."""
    masquerade: tuple[tuple[str, str], ...] = ()
    """(subnet, bridge) pairs: masquerade the subnet's egress not leaving through the bridge."""
    table: str = TABLE


# --- small expression helpers ------------------------------------------------

def _match(left: Any, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _ct(key: str, family: str | None = None, direction: str | None = None) -> Json:
    ct: Json = {"key": key}
    if family:
        ct["family"] = family
    if direction:
        ct["dir"] = direction
    return {"ct": ct}


def _payload(protocol: str, field: str) -> Json:
    return {"payload": {"protocol": protocol, "field": field}}


def _concat(*parts: Any) -> Json:
    return {"concat": list(parts)}


def _ports(start: int, end: int) -> Any:
    return start if start == end else {"range": [start, end]}


def _prefix(cidr: str) -> Json:
    net = ipaddress.ip_network(cidr, strict=False)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


# --- names ---------------------------------------------------------------------

def mapping_name(m: Mapping) -> str:
    """A readable, unique, nft-safe name for a mapping's chain and counters.

    ``tcp-9090``, ``udp-8000-8010``, ``tcp-9090-127.0.0.1``, ``tcp-9090-fd00..1`` (':'
    becomes '.'). The host address is part of the name because two mappings may share
    a port on different addresses.
    """
    ports = str(m.host_port) if m.host_port == m.host_port_end else f"{m.host_port}-{m.host_port_end}"
    name = f"{m.proto}-{ports}"
    if m.host_ip is not None and not m.host_ip.is_unspecified:
        name += "-" + str(m.host_ip).replace(":", ".")
    elif m.host_ip is None and m.family == 6:
        name += "-v6"
    return name


def connections_counter(m: Mapping) -> str:
    return f"{mapping_name(m)}-conns"


def traffic_counter(m: Mapping) -> str:
    return f"{mapping_name(m)}-traffic"


def _chain_name(m: Mapping) -> str:
    return f"map-{mapping_name(m)}"


def _count_chain_name(m: Mapping) -> str:
    return f"count-{mapping_name(m)}"


def _nfproto(m: Mapping) -> str:
    return "ipv4" if m.family == 4 else "ipv6"


class KernelMappingError(ValueError):
    """A mapping the kernel path cannot express (the message says why)."""


def check_mapping(m: Mapping) -> None:
    """Refuse what DNAT cannot do, rather than install a rule that never matches."""
    if m.host_ip is not None and not m.host_ip.is_unspecified and m.host_ip.version != m.family:
        raise KernelMappingError(
            f"mapping {m}: the kernel path cannot translate between IPv{m.host_ip.version} and IPv{m.family} "
            "(use the userland path)"
        )
    if m.dual_stack and m.family == 4:
        raise KernelMappingError(
            f"mapping {m}: a dual-stack [::] listener with an IPv4 target needs the userland path"
        )


# --- dispatch keys -----------------------------------------------------------------

def _dispatch_map(m: Mapping) -> str:
    if m.host_ip is None or m.host_ip.is_unspecified:
        return "dnat_any"
    return "dnat_ip4" if m.host_ip.version == 4 else "dnat_ip6"


def _dispatch_key(m: Mapping) -> Json:
    ports = _ports(m.host_port, m.host_port_end)
    if m.host_ip is None or m.host_ip.is_unspecified:
        return _concat(_nfproto(m), m.proto, ports)
    return _concat(str(m.host_ip), m.proto, ports)


# --- the table skeleton -----------------------------------------------------------

def _t(opts: KernelOptions) -> Json:
    return {"family": FAMILY, "table": opts.table}


def _base_chain(opts: KernelOptions, name: str, kind: str, hook: str, prio: int) -> Json:
    return {"add": {"chain": {**_t(opts), "name": name, "type": kind, "hook": hook, "prio": prio, "policy": "accept"}}}


def _rule(opts: KernelOptions, chain: str, *expr: Json) -> Json:
    return {"add": {"rule": {**_t(opts), "chain": chain, "expr": list(expr)}}}


_MAP_TYPES = {
    "dnat_any": ["nf_proto", "inet_proto", "inet_service"],
    "dnat_ip4": ["ipv4_addr", "inet_proto", "inet_service"],
    "dnat_ip6": ["ipv6_addr", "inet_proto", "inet_service"],
}
_DISPATCH_KEYS = {
    "dnat_any": _concat(_meta("nfproto"), _meta("l4proto"), _payload("th", "dport")),
    "dnat_ip4": _concat(_payload("ip", "daddr"), _meta("l4proto"), _payload("th", "dport")),
    "dnat_ip6": _concat(_payload("ip6", "daddr"), _meta("l4proto"), _payload("th", "dport")),
}


def table_skeleton(opts: KernelOptions) -> list[Json]:
    """Chains, maps and the fixed rules; everything but the mappings themselves."""
    t = _t(opts)
    cmds: list[Json] = [
        _base_chain(opts, "prerouting", "nat", "prerouting", -100),
        _base_chain(opts, "output", "nat", "output", -100),
        _base_chain(opts, "postrouting", "nat", "postrouting", 100),
        _base_chain(opts, "forward", "filter", "forward", -1),
        _base_chain(opts, "input", "filter", "input", -1),
        _base_chain(opts, "output_count", "filter", "output", -1),
        {"add": {"chain": {**t, "name": "dispatch"}}},
        {"add": {"chain": {**t, "name": "count"}}},
    ]
    for name, types in _MAP_TYPES.items():
        cmds.append({"add": {"map": {**t, "name": name, "type": types, "map": "verdict", "flags": ["interval"]}}})
    cmds.append({"add": {"map": {**t, "name": "count", "type": "mark", "map": "verdict"}}})
    local = _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")
    cmds.append(_rule(opts, "prerouting", local, {"jump": {"target": "dispatch"}}))
    # Loopback cannot be DNAT'd to another host unless route_localnet allows it.
    if not opts.route_localnet:
        cmds.append(_rule(opts, "output", _match(_payload("ip", "daddr"), _prefix("127.0.0.0/8")), {"return": None}))
    cmds.append(_rule(opts, "output", _match(_payload("ip6", "daddr"), "::1"), {"return": None}))
    cmds.append(_rule(opts, "output", local, {"jump": {"target": "dispatch"}}))
    for name, key in _DISPATCH_KEYS.items():
        cmds.append(_rule(opts, "dispatch", {"vmap": {"key": key, "data": f"@{name}"}}))
    # postrouting: masquerade what must come back through this host.
    dnat = _match(_ct("status"), "dnat", "in")
    hairpin = _match({"&": [_meta("mark"), HAIRPIN_MARK]}, HAIRPIN_MARK)
    cmds.append(_rule(opts, "postrouting", hairpin, dnat, {"masquerade": None}))
    cmds.append(_rule(opts, "postrouting", dnat, _match({"fib": {"result": "type", "flags": ["saddr"]}}, "local"),
                      {"masquerade": None}))
    for subnet, bridge in opts.masquerade:
        proto = "ip" if ipaddress.ip_network(subnet, strict=False).version == 4 else "ip6"
        cmds.append(_rule(opts, "postrouting",
                          _match(_payload(proto, "saddr"), _prefix(subnet)),
                          _match(_meta("oifname"), bridge, "!="),
                          {"masquerade": None}))
    # Byte counters: every packet of a DNAT'd flow, both directions.
    for chain in ("forward", "input", "output_count"):
        cmds.append(_rule(opts, chain, dnat, {"jump": {"target": "count"}}))
    cmds.append(_rule(opts, "count", {"vmap": {"key": {"&": [_ct("mark"), CT_MARK_MASK]}, "data": "@count"}}))
    # Published flows are accepted here; see the README for other tables' drop policies.
    cmds.append(_rule(opts, "forward", dnat, {"accept": None}))
    return cmds


# --- one mapping -----------------------------------------------------------------

def _dnat(m: Mapping) -> Json:
    family = "ip" if m.family == 4 else "ip6"
    dnat: Json = {"family": family, "addr": str(m.target_ip)}
    offset = m.target_port - m.host_port
    if m.host_port == m.host_port_end:
        dnat["port"] = m.target_port
    elif offset:
        dnat["port"] = {"map": {"key": _payload("th", "dport"),
                                "data": {"set": [[h, t] for h, t in m.port_pairs()]}}}
    return {"dnat": dnat}


def _mark_value(mapping_id: int) -> int:
    if not 1 <= mapping_id <= MAX_MAPPING_ID:
        raise ValueError(f"mapping id {mapping_id} out of range")
    return mapping_id << CT_MARK_SHIFT


def add_mapping(m: Mapping, mapping_id: int, opts: KernelOptions) -> list[Json]:
    """Commands that add one mapping, identified by ``mapping_id`` (1-65535), to the table."""
    check_mapping(m)
    mark = _mark_value(mapping_id)
    t = _t(opts)
    chain = _chain_name(m)
    count_chain = _count_chain_name(m)
    family = "ip" if m.family == 4 else "ip6"
    return [
        {"add": {"counter": {**t, "name": connections_counter(m)}}},
        {"add": {"counter": {**t, "name": traffic_counter(m)}}},
        {"add": {"chain": {**t, "name": chain}}},
        {"add": {"chain": {**t, "name": count_chain}}},
        _rule(opts, chain, {"counter": connections_counter(m)}),
        _rule(opts, chain, _match(_payload(family, "saddr"), str(m.target_ip)),
              {"mangle": {"key": _meta("mark"), "value": {"|": [_meta("mark"), HAIRPIN_MARK]}}}),
        _rule(opts, chain,
              {"mangle": {"key": _ct("mark"), "value": {"|": [{"&": [_ct("mark"), ~CT_MARK_MASK & 0xFFFFFFFF]}, mark]}}},
              _match(_meta("l4proto"), m.proto), _dnat(m)),
        _rule(opts, count_chain, {"counter": traffic_counter(m)}),
        {"add": {"element": {**t, "name": _dispatch_map(m), "elem": [[_dispatch_key(m), {"jump": {"target": chain}}]]}}},
        {"add": {"element": {**t, "name": "count", "elem": [[mark, {"jump": {"target": count_chain}}]]}}},
    ]


def remove_mapping(m: Mapping, mapping_id: int, opts: KernelOptions) -> list[Json]:
    """Commands that remove one mapping (map elements first: they reference the chains)."""
    t = _t(opts)
    return [
        {"delete": {"element": {**t, "name": _dispatch_map(m), "elem": [_dispatch_key(m)]}}},
        {"delete": {"element": {**t, "name": "count", "elem": [_mark_value(mapping_id)]}}},
        {"flush": {"chain": {**t, "name": _chain_name(m)}}},
        {"delete": {"chain": {**t, "name": _chain_name(m)}}},
        {"flush": {"chain": {**t, "name": _count_chain_name(m)}}},
        {"delete": {"chain": {**t, "name": _count_chain_name(m)}}},
        {"delete": {"counter": {**t, "name": connections_counter(m)}}},
        {"delete": {"counter": {**t, "name": traffic_counter(m)}}},
    ]


# --- whole tables ----------------------------------------------------------------------

def full_table(mappings: Iterable[tuple[Mapping, int]], opts: KernelOptions) -> list[Json]:
    """Replace the table with exactly these mappings, atomically and idempotently.

    ``add table`` + ``delete table`` first: the pair succeeds whether or not the table
    exists, so applying the same batch twice yields the same single table.
    """
    t = {"family": FAMILY, "name": opts.table}
    cmds: list[Json] = [{"add": {"table": t}}, {"delete": {"table": t}}, {"add": {"table": t}}]
    cmds += table_skeleton(opts)
    for m, mapping_id in mappings:
        cmds += add_mapping(m, mapping_id, opts)
    return cmds


def delete_table(opts: KernelOptions) -> list[Json]:
    t = {"family": FAMILY, "name": opts.table}
    return [{"add": {"table": t}}, {"delete": {"table": t}}]


def batch(commands: list[Json]) -> Json:
    """Wrap commands in the top-level object libnftables expects."""
    return {"nftables": [{"metainfo": {"json_schema_version": 1}}, *commands]}


def list_counters(opts: KernelOptions) -> Json:
    return batch([{"list": {"counters": {"family": FAMILY, "table": opts.table}}}])
