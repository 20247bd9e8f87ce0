"""The nft JSON builders are pure: these tests need no root and no kernel."""

from __future__ import annotations

import json

import pytest

from portproxy.kernel.builders import (
    CT_MARK_MASK,
    HAIRPIN_MARK,
    KernelMappingError,
    KernelOptions,
    add_mapping,
    batch,
    check_mapping,
    delete_table,
    full_table,
    mapping_name,
    remove_mapping,
)
from portproxy.spec import parse_spec

OPTS = KernelOptions()


def _rules(cmds: list[dict], chain: str) -> list[list[dict]]:
    return [c["add"]["rule"]["expr"] for c in cmds if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == chain]


def test_mapping_chain_has_counter_hairpin_mark_and_dnat() -> None:
    m = parse_spec("9090:172.16.1.1:8080")
    cmds = add_mapping(m, 7, OPTS)
    chain = _rules(cmds, "map-tcp-9090")
    assert chain[0] == [{"counter": "tcp-9090-conns"}]
    assert chain[1] == [
        {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "172.16.1.1"}},
        {"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"|": [{"meta": {"key": "mark"}}, HAIRPIN_MARK]}}},
    ]
    ct_mark, l4, dnat = chain[2]
    assert ct_mark["mangle"]["value"]["|"][1] == 7 << 16
    assert ct_mark["mangle"]["value"]["|"][0]["&"][1] == (~CT_MARK_MASK) & 0xFFFFFFFF
    assert l4 == {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}
    assert dnat == {"dnat": {"family": "ip", "addr": "172.16.1.1", "port": 8080}}
    elements = [c["add"]["element"] for c in cmds if "element" in c.get("add", {})]
    assert elements[0]["name"] == "dnat_any"
    assert elements[0]["elem"] == [[{"concat": ["ipv4", "tcp", 9090]}, {"jump": {"target": "map-tcp-9090"}}]]
    assert elements[1]["name"] == "count"
    assert elements[1]["elem"] == [[7 << 16, {"jump": {"target": "count-tcp-9090"}}]]


def test_host_address_uses_the_address_map() -> None:
    m = parse_spec("[fd00::fe]:9092:[fd00::1]:80/udp")
    cmds = add_mapping(m, 1, OPTS)
    element = next(c["add"]["element"] for c in cmds if "element" in c.get("add", {}))
    assert element["name"] == "dnat_ip6"
    assert element["elem"][0][0] == {"concat": ["fd00::fe", "udp", 9092]}
    dnat = _rules(cmds, f"map-{mapping_name(m)}")[2][-1]
    assert dnat == {"dnat": {"family": "ip6", "addr": "fd00::1", "port": 80}}


def test_range_maps_port_to_port() -> None:
    shifted = add_mapping(parse_spec("8000-8002:10.0.0.1:9000-9002/udp"), 1, OPTS)
    dnat = _rules(shifted, "map-udp-8000-8002")[2][-1]["dnat"]
    assert dnat["port"] == {"map": {"key": {"payload": {"protocol": "th", "field": "dport"}},
                                    "data": {"set": [[8000, 9000], [8001, 9001], [8002, 9002]]}}}
    same = add_mapping(parse_spec("7000-7002:10.0.0.1:7000-7002"), 2, OPTS)
    assert _rules(same, "map-tcp-7000-7002")[2][-1] == {"dnat": {"family": "ip", "addr": "10.0.0.1"}}
    element = next(c["add"]["element"] for c in same if "element" in c.get("add", {}))
    assert element["elem"][0][0] == {"concat": ["ipv4", "tcp", {"range": [7000, 7002]}]}


def test_full_table_is_replace_in_one_batch() -> None:
    cmds = full_table([(parse_spec("9090:172.16.1.1:8080"), 1)], OPTS)
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
    # Only our own table is ever named.
    for c in cmds:
        (verb, body), = c.items()
        (kind, obj), = body.items()
        assert obj["family"] == "inet"
        assert (obj["name"] if kind == "table" else obj["table"]) == "portproxy"


def test_loopback_excluded_unless_route_localnet() -> None:
    def output_rules(opts: KernelOptions) -> str:
        return json.dumps(_rules(full_table([], opts), "output"))

    assert '"addr": "127.0.0.0", "len": 8' in output_rules(KernelOptions())
    assert '"addr": "127.0.0.0", "len": 8' not in output_rules(KernelOptions(route_localnet=True))


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


def test_remove_deletes_elements_before_chains() -> None:
    m = parse_spec("9090:172.16.1.1:8080")
    cmds = remove_mapping(m, 3, OPTS)
    kinds = [(verb, next(iter(body))) for c in cmds for verb, body in c.items()]
    assert kinds[:2] == [("delete", "element"), ("delete", "element")]
    assert ("delete", "chain") in kinds and ("delete", "counter") in kinds
    assert cmds[1]["delete"]["element"]["elem"] == [3 << 16]


def test_delete_table_is_idempotent_pair() -> None:
    table = {"family": "inet", "name": "portproxy"}
    assert delete_table(OPTS) == [{"add": {"table": table}}, {"delete": {"table": table}}]
    assert batch([])["nftables"][0] == {"metainfo": {"json_schema_version": 1}}


@pytest.mark.parametrize("spec", ["127.0.0.1:9090:[fd00::1]:80", "[::]:9090:172.16.1.1:80", "[::1]:9090:10.0.0.1:80"])
def test_cross_family_refused(spec: str) -> None:
    with pytest.raises(KernelMappingError, match="userland"):
        check_mapping(parse_spec(spec))


def test_names_are_unique_per_listen_key() -> None:
    names = {mapping_name(parse_spec(s)) for s in [
        "9090:10.0.0.1:80", "9090:10.0.0.1:80/udp", "127.0.0.1:9090:10.0.0.1:80", "9090:[fd00::1]:80",
        "[fd00::fe]:9090:[fd00::1]:80", "9090-9091:10.0.0.1:80-81",
    ]}
    assert len(names) == 6
