"""The nft JSON builders are pure: these tests need no root and no kernel."""

from __future__ import annotations

import pytest

from portproxy.kernel.builders import (
    CT_MARK_MASK,
    KINDS,
    KernelMappingError,
    KernelOptions,
    add_mappings,
    batch,
    check_mapping,
    delete_table,
    full_table,
    parse_counters,
    remove_mappings,
)
from portproxy.spec import parse_spec

OPTS = KernelOptions()
T = {"family": "inet", "table": "portproxy"}


def _elements(cmds: list[dict], verb: str = "add") -> dict[str, list]:
    return {c[verb]["element"]["name"]: c[verb]["element"]["elem"] for c in cmds if "element" in c.get(verb, {})}


def _rules(cmds: list[dict], chain: str) -> list[list[dict]]:
    return [c["add"]["rule"]["expr"] for c in cmds if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == chain]


def test_mapping_is_elements_only() -> None:
    cmds = add_mappings([(parse_spec("9090:172.16.1.1:8080"), 7)], OPTS)
    assert all(set(c) == {"add"} and set(c["add"]) == {"element"} for c in cmds)
    key = {"concat": ["tcp", 9090]}
    assert _elements(cmds) == {
        "id4_any": [[key, 7 << 16]],
        "addr4_any": [[key, "172.16.1.1"]],
        "port4_any": [[key, 8080]],
        "to_target": [7 << 16],
        "to_client": [7 << 16],
        "targets4": ["172.16.1.1"],
    }


def test_host_address_uses_the_address_maps() -> None:
    cmds = add_mappings([(parse_spec("[fd00::fe]:9092:[fd00::1]:80/udp"), 1)], OPTS)
    key = {"concat": ["fd00::fe", "udp", 9092]}
    elements = _elements(cmds)
    assert elements["id6_addr"] == [[key, 1 << 16]]
    assert elements["addr6_addr"] == [[key, "fd00::1"]]
    assert elements["port6_addr"] == [[key, 80]]
    assert elements["targets6"] == ["fd00::1"]


def test_range_maps_port_to_port() -> None:
    elements = _elements(add_mappings([(parse_spec("8000-8002:10.0.0.1:9000-9002/udp"), 1)], OPTS))
    assert elements["port4_any"] == [[{"concat": ["udp", 8000 + i]}, 9000 + i] for i in range(3)]
    assert elements["to_target"] == elements["to_client"] == [1 << 16]


def test_dispatch_rules_take_address_and_port_from_maps() -> None:
    guard, *rules = _rules(full_table([], OPTS), "dispatch")
    assert guard[-1] == {"return": None}  # only a SYN starts a translated TCP flow
    assert len(rules) == len(KINDS) == 4
    nfproto, set_mark, dnat = rules[0]
    key = {"concat": [{"meta": {"key": "l4proto"}}, {"payload": {"protocol": "th", "field": "dport"}}]}
    assert nfproto == {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv4"}}
    assert set_mark == {"mangle": {"key": {"ct": {"key": "mark"}}, "value": {"map": {"key": key, "data": "@id4_any"}}}}
    assert dnat == {"dnat": {"family": "ip", "addr": {"map": {"key": key, "data": "@addr4_any"}},
                             "port": {"map": {"key": key, "data": "@port4_any"}}}}
    with_address = rules[1][1]["mangle"]["value"]["map"]["key"]["concat"][0]
    assert with_address == {"payload": {"protocol": "ip", "field": "daddr"}}


def test_full_table_is_replace_in_one_batch() -> None:
    cmds = full_table([(parse_spec("9090:172.16.1.1:8080"), 1), (parse_spec("9091:172.16.1.1:8080"), 2)], OPTS)
    table = {"family": "inet", "name": "portproxy"}
    assert cmds[:3] == [{"add": {"table": table}}, {"delete": {"table": table}}, {"add": {"table": table}}]
    hooks = {c["add"]["chain"]["name"]: (c["add"]["chain"]["type"], c["add"]["chain"]["hook"], c["add"]["chain"]["prio"])
             for c in cmds if "chain" in c.get("add", {}) and "hook" in c["add"]["chain"]}
    assert hooks == {
        "prerouting": ("nat", "prerouting", -100),
        "output": ("nat", "output", -100),
        "postrouting": ("nat", "postrouting", 100),
        "forward": ("filter", "forward", -1),
        "input": ("filter", "input", -1),
        "output_count": ("filter", "output", -1),
    }
    # One command per map however many mappings; a shared target appears once.
    elements = _elements(cmds)
    assert len(elements["id4_any"]) == 2 and elements["targets4"] == ["172.16.1.1"]
    # Only our own table is ever named.
    for c in cmds:
        (verb, body), = c.items()
        (kind, obj), = body.items()
        assert obj["family"] == "inet"
        assert (obj["name"] if kind == "table" else obj["table"]) == "portproxy"


def test_counting_rules() -> None:
    cmds = full_table([], OPTS)
    for chain in ("forward", "input", "output_count"):
        rules = _rules(cmds, chain)
        for rule, (direction, name) in zip(rules, (("original", "to_target"), ("reply", "to_client"))):
            assert {"match": {"op": "==", "left": {"ct": {"key": "direction"}}, "right": direction}} in rule
            assert {"match": {"op": "==", "left": {"&": [{"ct": {"key": "mark"}}, CT_MARK_MASK]},
                              "right": f"@{name}"}} in rule
    assert _rules(cmds, "forward")[-1][-1] == {"accept": None}
    counted = [c["add"]["set"] for c in cmds if "set" in c.get("add", {}) and c["add"]["set"]["name"] == "to_target"]
    assert counted[0]["stmt"] == [{"counter": None}]


def test_loopback_excluded_unless_route_localnet() -> None:
    loopback = {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                          "right": {"prefix": {"addr": "127.0.0.0", "len": 8}}}}
    assert [loopback, {"return": None}] in _rules(full_table([], KernelOptions()), "output")
    assert [loopback, {"return": None}] not in _rules(full_table([], KernelOptions(route_localnet=True)), "output")


def test_masquerade_option() -> None:
    rules = _rules(full_table([], KernelOptions(masquerade=(("172.17.0.0/24", "br0"),))), "postrouting")
    assert [
        {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                   "right": {"prefix": {"addr": "172.17.0.0", "len": 24}}}},
        {"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": "br0"}},
        {"masquerade": None},
    ] in rules


def test_user_input_is_data_never_syntax() -> None:
    """An interface name full of nft syntax stays one JSON string."""
    evil = 'br0"; flush ruleset; #'
    rules = _rules(full_table([], KernelOptions(masquerade=(("10.0.0.0/8", evil),))), "postrouting")
    assert {"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": evil}} in rules[-1]


def test_remove_deletes_the_same_elements_by_key() -> None:
    m = parse_spec("9090:172.16.1.1:8080")
    key = {"concat": ["tcp", 9090]}
    removed = _elements(remove_mappings([(m, 3, False)], OPTS), "delete")
    assert removed == {"id4_any": [key], "addr4_any": [key], "port4_any": [key], "to_target": [3 << 16],
                       "to_client": [3 << 16], "targets4": ["172.16.1.1"]}
    shared = _elements(remove_mappings([(m, 3, True)], OPTS), "delete")
    assert "targets4" not in shared


def test_delete_table_is_idempotent_pair() -> None:
    table = {"family": "inet", "name": "portproxy"}
    assert delete_table(OPTS) == [{"add": {"table": table}}, {"delete": {"table": table}}]
    assert batch([])["nftables"][0] == {"metainfo": {"json_schema_version": 1}}


def test_parse_counters_sums_range_ports() -> None:
    listing = [
        {"nftables": [{"map": {"name": "id4_any", "elem": [
            [{"elem": {"val": {"concat": ["tcp", 8000]}, "counter": {"packets": 2, "bytes": 120}}}, 1 << 16],
            [{"elem": {"val": {"concat": ["tcp", 8001]}, "counter": {"packets": 3, "bytes": 180}}}, 1 << 16],
        ]}}]},
        {"nftables": [{"set": {"name": "to_target", "elem": [
            {"elem": {"val": 1 << 16, "counter": {"packets": 40, "bytes": 5000}}}]}}]},
        {"nftables": [{"set": {"name": "to_client", "elem": [
            {"elem": {"val": 1 << 16, "counter": {"packets": 30, "bytes": 90000}}}]}}]},
    ]
    assert parse_counters(listing) == ({1 << 16: 5}, {"to_target": {1 << 16: (40, 5000)},
                                                      "to_client": {1 << 16: (30, 90000)}})


@pytest.mark.parametrize("spec", ["127.0.0.1:9090:[fd00::1]:80", "[::]:9090:172.16.1.1:80", "[::1]:9090:10.0.0.1:80"])
def test_cross_family_refused(spec: str) -> None:
    with pytest.raises(KernelMappingError, match="userland"):
        check_mapping(parse_spec(spec))


def test_expected_elements_and_skeleton_counts() -> None:
    from portproxy.kernel.builders import count_elements, expected_id_elements, expected_rule_counts

    ids = {parse_spec("9090-9092:10.0.0.1:80-82"): 1, parse_spec("127.0.0.1:9093:10.0.0.1:80"): 2,
           parse_spec("9094:[fd00::1]:80/udp"): 3}
    assert expected_id_elements(ids) == {"id4_any": 3, "id4_addr": 1, "id6_any": 1, "id6_addr": 0}
    assert count_elements({"nftables": [{"metainfo": {}}, {"map": {"name": "id4_any", "elem": [[1, 2], [3, 4]]}}]}) == 2
    counts = expected_rule_counts(OPTS)
    assert counts["dispatch"] == 5 and counts["prerouting"] == 1 and set(counts) >= {"forward", "output_count"}
