"""Pure builders: mappings in, libnftables JSON commands out. No I/O, no root needed.

Everything lives in one ``inet portproxy`` table (IPv4 and IPv6 together), and a
mapping is nothing but *elements* of a few maps — no chain or rule per mapping::

    nat prerouting (-100)   fib daddr type local → jump dispatch
    nat output     (-100)   not 127/8 (unless route_localnet) nor ::1; fib daddr type local → jump dispatch
    dispatch                TCP segments other than a SYN return (never translate mid-stream), then
                            one rule per (family, host-address kind), e.g. for IPv4 without host address:
        meta nfproto ipv4  ct mark set K map @id4_any
                           dnat ip to K map @addr4_any : K map @port4_any
        with K = meta l4proto . th dport (``ip daddr . meta l4proto . th dport`` where the
        mapping names a host address). A key absent from the maps ends the rule: the
        packet is not ours. Hash maps, so one lookup whatever the number of mappings.
    nat postrouting (100)   masquerade DNAT'd flows that must come back through this host:
                            from a target (@targets4/6: hairpin, a container reaching a
                            published port), from the host itself (fib saddr type local),
                            and optionally a container subnet's egress (-s SUBNET ! -o BRIDGE)
    filter forward/input/output (-1)
                            ct status dnat  ct direction original  ct mark & 0xffff0000 @to_target
                            ct status dnat  ct direction reply     ct mark & 0xffff0000 @to_client
                            (+ accept in forward)

Counting uses per-element counters: the @id maps count the packets that looked the
element up — a nat chain sees only a flow's first packet, so that is the number of
connections — and @to_target / @to_client, looked up by every packet of a translated
flow (found by the mapping id the dispatch rule stored in its conntrack mark), count
packets and bytes per direction.

Why maps instead of a verdict map jumping to a chain per mapping: in libnftables'
JSON API every rule, chain and named counter is a separate command costing tens to
hundreds of microseconds, so 10,000 mappings took seconds to apply; elements go in
one command per map. The dnat takes address and port from two single-value maps,
which nft 1.0.6 JSON can express (it cannot express concatenated map *values*).

The JSON API (not nft text) carries user input, so nothing here is ever parsed as
nft syntax.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any, Iterable, Iterator

from ..errors import BadInput
from ..spec import Part

MAX_DAEMON_ID = 0x7FFF
"""The daemon's table's mapping ids are 1-0x7FFF: the CNI plugin's table uses 0x8000 up
(:data:`portproxy.cni.table.ID_MIN`), and a flow's conntrack mark names one of either."""

TABLE = "portproxy"
FAMILY = "inet"
CT_MARK_SHIFT = 16
CT_MARK_MASK = 0xFFFF0000
"""A translated flow's conntrack mark holds its mapping id in these bits."""
MAX_MAPPING_ID = 0xFFFF

Json = dict[str, Any]
TRAFFIC_SETS = ("to_target", "to_client")


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    route_localnet: bool = False
    """Also publish on 127.0.0.0/8 (needs net.ipv4.conf.all.route_localnet=1)."""
    masquerade: tuple[tuple[str, str], ...] = ()
    """(subnet, bridge) pairs: masquerade the subnet's egress not leaving through the bridge."""
    table: str = TABLE
    # Additive knobs for tables other than the daemon's (the CNI plugin's); the defaults
    # build exactly the daemon's table.
    masquerade_published: bool = True
    """Masquerade hairpin and host-originated DNAT'd flows (CNI ``snat``)."""
    masquerade_all: bool = False
    """Masquerade every DNAT'd flow, whatever its source (CNI ``masqAll``)."""
    conditions: tuple[tuple[str, str, str, str], ...] = ()
    """Extra matches before dispatch, as (``ip``|``ip6``, ``saddr``|``daddr``, ``==``|``!=``, CIDR):
    a family's traffic is dispatched only when all of its family's conditions hold."""


class KernelMappingError(BadInput):
    """A mapping the kernel path cannot express (the message says why)."""


def why_not_translated(m: Part, opts: KernelOptions) -> str | None:
    """Why DNAT cannot serve this (one-family) mapping, or None if it can. What it cannot
    serve the userland proxy serves instead, wherever a mapping is realised."""
    if not m.translatable:
        return f"DNAT cannot translate IPv{m.listen_ip().version} to IPv{m.family}"
    if m.host_ip is not None and m.host_ip.is_loopback and not (m.host_ip.version == 4 and opts.route_localnet):
        return ("DNAT cannot take loopback traffic" +
                (" without route_localnet" if m.host_ip.version == 4 else " (IPv6 has no route_localnet)"))
    return None


def check_mapping(m: Part, opts: KernelOptions | None = None) -> None:
    """Refuse what DNAT cannot do, rather than install a rule that never matches."""
    reason = why_not_translated(m, opts or KernelOptions(route_localnet=True))
    if reason:
        raise KernelMappingError(f"mapping {m}: the kernel path cannot serve it: {reason} "
                                 "(that part is served by the userland path)")


# --- expression helpers --------------------------------------------------------------

def _match(left: Any, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _ct(key: str) -> Json:
    return {"ct": {"key": key}}


def _payload(protocol: str, field: str) -> Json:
    return {"payload": {"protocol": protocol, "field": field}}


def _prefix(cidr: str) -> Json:
    net = ipaddress.ip_network(cidr, strict=False)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _lookup(key: Json, name: str) -> Json:
    return {"map": {"key": key, "data": f"@{name}"}}


# --- the maps ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Kind:
    """One dispatch rule: a family and whether the mapping names a host address."""

    family: int
    with_address: bool

    @property
    def suffix(self) -> str:
        return f"{self.family}_{'addr' if self.with_address else 'any'}"

    @property
    def l3(self) -> str:
        return "ip" if self.family == 4 else "ip6"

    @property
    def key(self) -> Json:
        parts = [_meta("l4proto"), _payload("th", "dport")]
        if self.with_address:
            parts.insert(0, _payload(self.l3, "daddr"))
        return {"concat": parts}

    @property
    def key_type(self) -> list[str]:
        types = ["inet_proto", "inet_service"]
        if self.with_address:
            types.insert(0, "ipv4_addr" if self.family == 4 else "ipv6_addr")
        return types


KINDS = [_Kind(4, False), _Kind(4, True), _Kind(6, False), _Kind(6, True)]


def _kind_of(m: Part) -> _Kind:
    return _Kind(m.family, m.host_ip is not None and not m.host_ip.is_unspecified)


def id_map(kind: _Kind) -> str:
    return f"id{kind.suffix}"


def _addr_map(kind: _Kind) -> str:
    return f"addr{kind.suffix}"


def _port_map(kind: _Kind) -> str:
    return f"port{kind.suffix}"


def _targets_set(m: Part) -> str:
    return "targets4" if m.family == 4 else "targets6"


def mark_of(mapping_id: int) -> int:
    """The conntrack mark (and @to_target / @to_client element) of a mapping id."""
    if not 1 <= mapping_id <= MAX_MAPPING_ID:
        raise ValueError(f"mapping id {mapping_id} out of range")
    return mapping_id << CT_MARK_SHIFT


# --- the table skeleton ---------------------------------------------------------------

def _t(opts: KernelOptions) -> Json:
    return {"family": FAMILY, "table": opts.table}


def _base_chain(opts: KernelOptions, name: str, kind: str, hook: str, prio: int) -> Json:
    return {"add": {"chain": {**_t(opts), "name": name, "type": kind, "hook": hook, "prio": prio, "policy": "accept"}}}


def _rule(opts: KernelOptions, chain: str, *expr: Json) -> Json:
    return {"add": {"rule": {**_t(opts), "chain": chain, "expr": list(expr)}}}


_COUNTED = [{"counter": None}]


def table_skeleton(opts: KernelOptions) -> list[Json]:
    """Chains, maps, sets and rules: everything but the mappings, which are elements."""
    t = _t(opts)
    cmds: list[Json] = [
        _base_chain(opts, "prerouting", "nat", "prerouting", -100),
        _base_chain(opts, "output", "nat", "output", -100),
        _base_chain(opts, "postrouting", "nat", "postrouting", 100),
        _base_chain(opts, "forward", "filter", "forward", -1),
        _base_chain(opts, "input", "filter", "input", -1),
        _base_chain(opts, "output_count", "filter", "output", -1),
        {"add": {"chain": {**t, "name": "dispatch"}}},
        *({"add": {"set": {**t, "name": name, "type": "mark", "stmt": _COUNTED}}} for name in TRAFFIC_SETS),
        {"add": {"set": {**t, "name": "targets4", "type": "ipv4_addr"}}},
        {"add": {"set": {**t, "name": "targets6", "type": "ipv6_addr"}}},
    ]
    for kind in KINDS:
        cmds += [
            {"add": {"map": {**t, "name": id_map(kind), "type": kind.key_type, "map": "mark", "stmt": _COUNTED}}},
            {"add": {"map": {**t, "name": _addr_map(kind), "type": kind.key_type,
                             "map": "ipv4_addr" if kind.family == 4 else "ipv6_addr"}}},
            {"add": {"map": {**t, "name": _port_map(kind), "type": kind.key_type, "map": "inet_service"}}},
        ]
    local = _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")
    for guard in _dispatch_guards(opts):
        cmds.append(_rule(opts, "prerouting", *guard, local, {"jump": {"target": "dispatch"}}))
    # Loopback cannot be DNAT'd to another host unless route_localnet allows it.
    if not opts.route_localnet:
        cmds.append(_rule(opts, "output", _match(_payload("ip", "daddr"), _prefix("127.0.0.0/8")), {"return": None}))
    cmds.append(_rule(opts, "output", _match(_payload("ip6", "daddr"), "::1"), {"return": None}))
    for guard in _dispatch_guards(opts):
        cmds.append(_rule(opts, "output", *guard, local, {"jump": {"target": "dispatch"}}))
    # Only a SYN may start a translated TCP flow. Where conntrack was not running before
    # this table existed (a fresh namespace), the next segment of a connection the
    # userland proxy already relays is picked up mid-stream as a *new* flow; translating
    # it would send it to the target, which answers with a reset.
    cmds.append(_rule(opts, "dispatch", _match(_meta("l4proto"), "tcp"),
                      _match({"&": [_payload("tcp", "flags"), ["syn", "ack"]]}, "syn", "!="), {"return": None}))
    for kind in KINDS:
        cmds.append(_rule(
            opts, "dispatch",
            _match(_meta("nfproto"), "ipv4" if kind.family == 4 else "ipv6"),
            {"mangle": {"key": _ct("mark"), "value": _lookup(kind.key, id_map(kind))}},
            {"dnat": {"family": kind.l3, "addr": _lookup(kind.key, _addr_map(kind)),
                      "port": _lookup(kind.key, _port_map(kind))}},
        ))
    # postrouting: masquerade what must come back through this host.
    dnat = _match(_ct("status"), "dnat", "in")
    if opts.masquerade_all:
        cmds.append(_rule(opts, "postrouting", dnat, {"masquerade": None}))
    elif opts.masquerade_published:
        cmds.append(_rule(opts, "postrouting", dnat, _match(_payload("ip", "saddr"), "@targets4"), {"masquerade": None}))
        cmds.append(_rule(opts, "postrouting", dnat, _match(_payload("ip6", "saddr"), "@targets6"),
                          {"masquerade": None}))
        cmds.append(_rule(opts, "postrouting", dnat, _match({"fib": {"result": "type", "flags": ["saddr"]}}, "local"),
                          {"masquerade": None}))
    for subnet, bridge in opts.masquerade:
        proto = "ip" if ipaddress.ip_network(subnet, strict=False).version == 4 else "ip6"
        cmds.append(_rule(opts, "postrouting",
                          _match(_payload(proto, "saddr"), _prefix(subnet)),
                          _match(_meta("oifname"), bridge, "!="),
                          {"masquerade": None}))
    # Every packet of a translated flow, counted by mapping id and direction.
    for chain in ("forward", "input", "output_count"):
        for direction, name in (("original", "to_target"), ("reply", "to_client")):
            cmds.append(_rule(opts, chain, dnat, _match(_ct("direction"), direction),
                              _match({"&": [_ct("mark"), CT_MARK_MASK]}, f"@{name}")))
    # Published flows are accepted here; see the README for other tables' drop policies.
    cmds.append(_rule(opts, "forward", dnat, {"accept": None}))
    return cmds


def _dispatch_guards(opts: KernelOptions) -> list[list[Json]]:
    """The matches in front of each jump to dispatch: none, or with conditions one list per family."""
    if not opts.conditions:
        return [[]]
    guards = []
    for l3, nfproto in (("ip", "ipv4"), ("ip6", "ipv6")):
        guard = [_match(_meta("nfproto"), nfproto)]
        guard += [_match(_payload(cl3, field), _prefix(cidr), op) for cl3, field, op, cidr in opts.conditions
                  if cl3 == l3]
        guards.append(guard)
    return guards


# --- mappings as elements ------------------------------------------------------------------

def _keys(m: Part) -> Iterator[tuple[Any, int]]:
    """(map key, target port) for every host port; ranges are expanded port by port."""
    kind = _kind_of(m)
    for host_port, target_port in m.port_pairs():
        parts: list[Any] = [m.proto, host_port]
        if kind.with_address:
            parts.insert(0, str(m.host_ip))
        yield {"concat": parts}, target_port


def mapping_elements(m: Part, mapping_id: int, comment: str | None = None,
                     label: str | None = None) -> list[tuple[str, Any]]:
    """(map or set name, element) pairs that make up one mapping.

    ``comment`` goes on the mapping's @to_target element: a table shared by short-lived
    writers (the CNI plugin) records there who owns the mapping id; ``label`` (for people:
    the pod's name) on its @to_client element.
    """
    check_mapping(m)
    kind = _kind_of(m)
    mark = mark_of(mapping_id)
    target = str(m.target_ip)
    elements: list[tuple[str, Any]] = []
    for key, target_port in _keys(m):
        elements += [(id_map(kind), [key, mark]), (_addr_map(kind), [key, target]), (_port_map(kind), [key, target_port])]
    owned: Any = mark if comment is None else {"elem": {"val": mark, "comment": comment}}
    shown: Any = mark if label is None else {"elem": {"val": mark, "comment": label}}
    elements += [("to_target", owned), ("to_client", shown), (_targets_set(m), target)]
    return elements


def _element_commands(verb: str, opts: KernelOptions, elements: Iterable[tuple[str, Any]]) -> list[Json]:
    """One command per map or set, whatever the number of elements."""
    by_name: dict[str, list[Any]] = {}
    seen_targets: set[str] = set()
    for name, element in elements:
        if name.startswith("targets"):
            if element in seen_targets:
                continue  # several mappings may share a target
            seen_targets.add(element)
        by_name.setdefault(name, []).append(element)
    return [{verb: {"element": {**_t(opts), "name": name, "elem": elems}}} for name, elems in by_name.items()]


def add_mappings(mappings: Iterable[tuple[Part, int]], opts: KernelOptions, comment: str | None = None,
                 label: str | None = None) -> list[Json]:
    """Commands that add mappings, each identified by its id (1-65535): one command per map
    or set, however many mappings."""
    elements: list[tuple[str, Any]] = []
    for m, mapping_id in mappings:
        elements += mapping_elements(m, mapping_id, comment, label)
    return _element_commands("add", opts, elements)


def delete_elements(opts: KernelOptions, elements: Iterable[tuple[str, Any]]) -> list[Json]:
    """Commands that delete (map or set name, key) pairs, one command per map or set."""
    return _element_commands("delete", opts, elements)


def kind_maps(family: int, with_address: bool) -> tuple[str, str, str]:
    """Names of the (id, address, port) maps of one dispatch kind."""
    kind = _Kind(family, with_address)
    return id_map(kind), _addr_map(kind), _port_map(kind)


def element_keys(m: Part) -> list[tuple[str, tuple[Any, ...], int]]:
    """(id map name, key parts, target port) for every host port of a mapping."""
    name = id_map(_kind_of(m))
    return [(name, tuple(key["concat"]), target_port) for key, target_port in _keys(m)]


def list_table(opts: KernelOptions) -> Json:
    """Read command for the whole table (maps and sets with their elements)."""
    return batch([{"list": {"table": {"family": FAMILY, "name": opts.table}}}])


def remove_mappings(mappings: Iterable[tuple[Part, int, bool]], opts: KernelOptions) -> list[Json]:
    """Commands that remove (mapping, id, target still used) triples: one command per map or
    set (1,000 mappings one by one were ~7,000 commands to parse). A target still used by
    another mapping stays in @targets."""
    keys_only = []
    for m, mapping_id, target_still_used in mappings:
        for name, element in mapping_elements(m, mapping_id):
            if name.startswith("targets") and target_still_used:
                continue
            keys_only.append((name, element[0] if isinstance(element, list) else element))
    return _element_commands("delete", opts, keys_only)


# --- whole tables ----------------------------------------------------------------------

def full_table(mappings: Iterable[tuple[Part, int]], opts: KernelOptions) -> list[Json]:
    """Replace the table with exactly these mappings, atomically and idempotently.

    ``add table`` + ``delete table`` first: the pair succeeds whether or not the table
    exists, so applying the same batch twice yields the same single table.
    """
    t = {"family": FAMILY, "name": opts.table}
    cmds: list[Json] = [{"add": {"table": t}}, {"delete": {"table": t}}, {"add": {"table": t}}]
    cmds += table_skeleton(opts)
    elements: list[tuple[str, Any]] = []
    for m, mapping_id in mappings:
        elements += mapping_elements(m, mapping_id)
    return cmds + _element_commands("add", opts, elements)


def delete_table(opts: KernelOptions) -> list[Json]:
    t = {"family": FAMILY, "name": opts.table}
    return [{"add": {"table": t}}, {"delete": {"table": t}}]


def batch(commands: list[Json]) -> Json:
    """Wrap commands in the top-level object libnftables expects."""
    return {"nftables": [{"metainfo": {"json_schema_version": 1}}, *commands]}


def list_counters(opts: KernelOptions) -> list[Json]:
    """Read commands for every counted map and set (their elements carry the counters).
    One per map: a ``list table`` would also turn every address and port element into
    JSON, which measured slower than five small lists at 16,000 ports (1.3-1.9 s against
    0.5-0.8 s)."""
    t = _t(opts)
    names = [id_map(kind) for kind in KINDS]
    return [batch([{"list": {"map": {"family": FAMILY, "table": t["table"], "name": name}}}]) for name in names] + [
        batch([{"list": {"set": {"family": FAMILY, "table": t["table"], "name": name}}}]) for name in TRAFFIC_SETS
    ]


COUNTED = {*(id_map(kind) for kind in KINDS), *TRAFFIC_SETS}
"""The maps and sets whose elements carry counters (not the address and port maps)."""


def parse_counters(outputs: list[dict]) -> tuple[dict[int, int], dict[str, dict[int, tuple[int, int]]]]:
    """From :func:`list_counters` output: connections by mark, and per direction set
    ("to_target", "to_client") the (packets, bytes) by mark."""
    connections: dict[int, int] = {}
    traffic: dict[str, dict[int, tuple[int, int]]] = {name: {} for name in TRAFFIC_SETS}
    for out in outputs:
        for item in out.get("nftables", []):
            container = item.get("map") or item.get("set")
            if not container or container.get("name") not in COUNTED:
                continue
            for elem in container.get("elem", []):
                if isinstance(elem, list):  # map: [{"elem": {val, counter}}, mark]
                    wrapped, mark = elem
                    counter = wrapped.get("elem", {}).get("counter", {}) if isinstance(wrapped, dict) else {}
                    connections[mark] = connections.get(mark, 0) + counter.get("packets", 0)
                elif isinstance(elem, dict) and "elem" in elem and container.get("name") in traffic:
                    counter = elem["elem"].get("counter", {})
                    traffic[container["name"]][elem["elem"]["val"]] = (counter.get("packets", 0),
                                                                       counter.get("bytes", 0))
    return connections, traffic


# --- checking what the kernel has --------------------------------------------------------

def chain_names(opts: KernelOptions) -> list[str]:
    """Every chain of the table, in skeleton order."""
    return [c["add"]["chain"]["name"] for c in table_skeleton(opts) if "chain" in c.get("add", {})]


def list_chains() -> Json:
    """Every chain of the family, without rules: cheap whatever the size of the maps
    (listing a table, or a chain with its rules, makes libnftables read every element)."""
    return batch([{"list": {"chains": {"family": FAMILY}}}])


def chains_of(output: dict, opts: KernelOptions) -> set[str]:
    return {item["chain"]["name"] for item in output.get("nftables", [])
            if "chain" in item and item["chain"].get("table") == opts.table}


def list_chain(opts: KernelOptions, name: str) -> Json:
    """Read one chain with its rules (libnftables takes one list command per call)."""
    return batch([{"list": {"chain": {**_t(opts), "name": name}}}])


def expected_rule_counts(opts: KernelOptions) -> dict[str, int]:
    counts = dict.fromkeys(chain_names(opts), 0)
    for command in table_skeleton(opts):
        rule = command.get("add", {}).get("rule")
        if rule is not None:
            counts[rule["chain"]] += 1
    return counts


def list_map(opts: KernelOptions, name: str) -> Json:
    return batch([{"list": {"map": {**_t(opts), "name": name}}}])


def expected_id_elements(ids: dict[Part, int]) -> dict[str, int]:
    """How many elements each id map holds for these mappings (one per host port)."""
    counts = {id_map(kind): 0 for kind in KINDS}
    for m in ids:
        counts[id_map(_kind_of(m))] += m.port_count
    return counts


def count_elements(output: dict) -> int:
    return sum(len(item[kind].get("elem", [])) for item in output.get("nftables", []) for kind in ("map", "set")
               if kind in item)


def count_rules(output: dict) -> int:
    return sum(1 for item in output.get("nftables", []) if "rule" in item)


def skeleton_difference(found: dict[str, int | None], opts: KernelOptions) -> str | None:
    """What differs between the chains read from the kernel (rule counts, None for a
    missing chain) and the skeleton portproxy installs; None when nothing does."""
    for name, expected in expected_rule_counts(opts).items():
        count = found.get(name)
        if count is None:
            return f"chain {name} of the nft table {opts.table} is missing"
        if count != expected:
            return f"chain {name} of the nft table {opts.table} has {count} rule(s), not {expected}"
    return None
