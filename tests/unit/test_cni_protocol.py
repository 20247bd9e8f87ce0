"""portproxy-cni's pure parts: the CNI contract, conditions, table bookkeeping. No root, no nft."""

from __future__ import annotations

import io
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portproxy.cni import main as cni_main
from portproxy.cni import protocol as p
from portproxy.cni.conditions import ConditionError, parse_conditions
from portproxy.cni.table import TABLE, Entry, State, parse_state, removal, routed_interface
from portproxy.cni.versions import version_json
from portproxy.kernel import builders
from portproxy.kernel.builders import KernelOptions
from portproxy.spec import parse_spec

PREV_100 = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "cni0", "mac": "aa"}, {"name": "veth1"}, {"name": "eth0", "sandbox": "/run/netns/x"}],
    "ips": [{"address": "10.88.0.1/16", "interface": 0}, {"address": "10.88.0.2/16", "gateway": "10.88.0.1",
                                                          "interface": 2},
            {"address": "10.88.0.3/16", "interface": 2}, {"address": "fd00::2/64", "interface": 2}],
}
PREV_040 = {"cniVersion": "0.4.0", "interfaces": PREV_100["interfaces"],
            "ips": [{"version": "4", "address": "10.88.0.2/16", "interface": 2}]}
ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/x", "CNI_IFNAME": "eth0",
       "CNI_PATH": "/opt/cni/bin", "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=web;K8S_POD_NAMESPACE=ns1"}


def conf(**extra: object) -> dict:
    return {"cniVersion": "1.0.0", "name": "net1", "type": "portproxy-cni", **extra}


# --- environment and configuration ---------------------------------------------------------

def test_env_requires_what_the_command_needs() -> None:
    assert p.parse_env(ENV).args["K8S_POD_NAME"] == "web"
    assert p.parse_env({"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "c", "CNI_IFNAME": "eth0"}).netns == ""
    for env in ({"CNI_COMMAND": "ADD"}, {"CNI_COMMAND": "FROB"}, {}):
        with pytest.raises(p.CniError) as err:
            p.parse_env(env)
        assert err.value.code == p.ERR_INVALID_ENV


@pytest.mark.parametrize("command", ["ADD", "CHECK", "DEL"])
@pytest.mark.parametrize("name, value, why", [
    ("CNI_CONTAINERID", "a b", "invalid characters"),  # the owner token is space-separated
    ("CNI_CONTAINERID", "-abc", "invalid characters"), ("CNI_CONTAINERID", "a/b", "invalid characters"),
    ("CNI_CONTAINERID", "abc\n", "invalid characters"), ("CNI_CONTAINERID", "c\u00e9", "invalid characters"),
    ("CNI_IFNAME", ".", ". or .."), ("CNI_IFNAME", "..", ". or .."), ("CNI_IFNAME", "e/0", "/ or :"),
    ("CNI_IFNAME", "e:0", "/ or :"), ("CNI_IFNAME", "e 0", "whitespace"), ("CNI_IFNAME", "e\u30000", "whitespace"),
    ("CNI_IFNAME", "x" * 16, "too long"), ("CNI_IFNAME", "\u00e9" * 8, "16 bytes"),  # 8 characters, 16 bytes
    ("CNI_IFNAME", "eth\udcff", "not UTF-8"),  # an undecodable byte, as os.environ holds it
])
def test_ids_validated_like_the_go_skel(command: str, name: str, value: str, why: str) -> None:
    """libcni's ValidateContainerID / ValidateInterfaceName, where skel applies them: code 4."""
    with pytest.raises(p.CniError, match=why) as err:
        p.parse_env({**ENV, "CNI_COMMAND": command, name: value})
    assert err.value.code == p.ERR_INVALID_ENV


def test_valid_ids_and_commands_that_take_none() -> None:
    for cid, ifname in (("c1", "eth0"), ("a.b_c-D9", "x" * 15), ("0" * 64, "\u00e9" * 7), ("x", "e\u00a1")):
        env = p.parse_env({**ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": "", "CNI_CONTAINERID": cid, "CNI_IFNAME": ifname})
        assert (env.container_id, env.ifname, env.netns) == (cid, ifname, "")  # DEL needs no netns
    for command in ("VERSION", "GC", "STATUS"):  # skel validates them only where they are required
        assert p.parse_env({"CNI_COMMAND": command, "CNI_CONTAINERID": "a b", "CNI_IFNAME": "."}).command == command
    with pytest.raises(p.CniError, match="needs CNI_IFNAME") as err:
        p.parse_env({**ENV, "CNI_IFNAME": ""})
    assert err.value.code == p.ERR_INVALID_ENV


@pytest.mark.parametrize("name, why", [
    (None, "missing"), ("", "missing"), ("a b", "invalid characters"), ("-net", "invalid characters"),
    ("net/1", "invalid characters"), (7, "invalid characters"), ("n" * 257, "too long"),
])
def test_network_name_validated(name: object, why: str) -> None:
    """libcni's ValidateNetworkName, for every command but VERSION: code 7."""
    raw = conf(name=name) if name is not None else {k: v for k, v in conf().items() if k != "name"}
    with pytest.raises(p.CniError, match=why) as err:
        p.parse_config(raw)
    assert err.value.code == p.ERR_INVALID_CONFIG
    assert p.parse_config(conf(name="cni-podman1.x_y")).name == "cni-podman1.x_y"
    assert p.parse_config(conf(name="n" * 256)).name == "n" * 256


def test_invalid_input_answered_as_cni_error_json(recorder: Recorder) -> None:
    rc, err = run({**ENV, "CNI_COMMAND": "DEL", "CNI_CONTAINERID": "a b"}, json.dumps(conf()).encode())
    assert (rc, err["code"], err["msg"]) == (1, 4, "invalid characters in CNI_CONTAINERID 'a b'")
    rc, err = run({**ENV, "CNI_COMMAND": "GC"}, json.dumps(conf(name="my net")).encode())
    assert (rc, err["code"]) == (1, 7) and "network name" in err["msg"]
    assert recorder.calls == []


def test_versions() -> None:
    assert p.check_version(conf(cniVersion="0.4.0")) == "0.4.0"
    with pytest.raises(p.CniError) as err:
        p.check_version(conf(cniVersion="0.3.1"))
    assert err.value.code == p.ERR_INCOMPATIBLE_VERSION
    assert version_json("1.0.0") == {"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]}


def test_port_mappings_parsed_and_checked() -> None:
    c = p.parse_config(conf(runtimeConfig={"portMappings": [
        {"hostPort": 80, "containerPort": 8080, "protocol": "TCP"},
        {"hostPort": 53, "containerPort": 53, "protocol": "udp", "hostIP": "192.0.2.1"}]}))
    assert c.port_mappings == (p.PortMapping(80, 8080, "tcp", None),
                               p.PortMapping(53, 53, "udp", ipaddress.ip_address("192.0.2.1")))
    assert c.snat and not c.masq_all
    bad = [{"hostPort": 0, "containerPort": 1}, {"hostPort": "80", "containerPort": 1},
           {"hostPort": 1, "containerPort": 1, "protocol": "sctp"}, {"hostPort": 1, "containerPort": 1, "hostIP": "x"},
           {"hostPort": True, "containerPort": 1}, "80:80"]
    for entry in bad:
        with pytest.raises(p.CniError) as err:
            p.parse_config(conf(runtimeConfig={"portMappings": [entry]}))
        assert err.value.code == p.ERR_INVALID_CONFIG
    for field in ({"externalSetMarkChain": "X"}, {"backend": "iptables"}):
        with pytest.raises(p.CniError) as err:
            p.parse_config(conf(**field))
        assert err.value.code == p.ERR_UNSUPPORTED_FIELD


def test_container_addresses_follow_portmap() -> None:
    """First IPv4 and first IPv6 of the sandbox interface; host-side interfaces are skipped."""
    assert p.container_addresses(PREV_100, "eth0") == [ipaddress.ip_address("10.88.0.2"),
                                                       ipaddress.ip_address("fd00::2")]
    assert p.container_addresses(PREV_040, "eth0") == [ipaddress.ip_address("10.88.0.2")]
    assert p.container_addresses(PREV_100, "eth1") == []
    assert p.container_addresses({"ips": [{"address": "10.0.0.5/8"}]}, "eth0") == [ipaddress.ip_address("10.0.0.5")]


def test_mappings_per_family_and_ranges_joined() -> None:
    entries = tuple(p.PortMapping(8000 + i, 80 + i, "tcp", None) for i in range(3)) + (
        p.PortMapping(53, 53, "udp", ipaddress.ip_address("192.0.2.1")),
        p.PortMapping(9000, 90, "tcp", ipaddress.ip_address("::")))
    got = p.mappings_for(entries, p.container_addresses(PREV_100, "eth0"))
    assert [str(m) for m in got] == [
        "8000-8002:10.88.0.2:80-82/tcp", "192.0.2.1:53:10.88.0.2:53/udp",
        "8000-8002:[fd00::2]:80-82/tcp", "9000:[fd00::2]:90/tcp"]


def test_result_converted_to_the_config_version() -> None:
    assert p.result_for(PREV_100, "0.4.0")["ips"][1]["version"] == "4"
    assert "version" not in p.result_for(PREV_040, "1.0.0")["ips"][0]
    assert p.result_for(PREV_040, "1.0.0")["cniVersion"] == "1.0.0"


def test_owner_token_and_gc() -> None:
    owner = p.Owner("net1", "c1", "eth0", "web", "ns1")
    assert owner.token() == "c1 eth0 net1"
    assert owner.controller_owner() == {"kind": "cni", "id": "c1", "ifname": "eth0", "network": "net1",
                                        "name": "web", "namespace": "ns1"}
    long_net = "n" * 100
    token = p.Owner(long_net, "c" * 64, "eth0").token()
    assert len(token) <= p.COMMENT_MAX and token.endswith(p.network_hash(long_net))
    assert p.gc_doomed(token, long_net, set()) and not p.gc_doomed(token, long_net, {("c" * 64, "eth0")})
    assert not p.gc_doomed("c1 eth0 net1", "net2", set())
    with pytest.raises(p.CniError):
        p.Owner("n", "c" * 200, "eth0").token()


def test_comments_and_tokens_measured_in_bytes() -> None:
    """nft limits a comment to 127 bytes: 64 four-byte emoji made libnftables abort."""
    for pod in ("\U0001F600" * 64, "a" + "\U0001F600" * 40, "\u00e9" * 100, "w\udcff" * 80):
        label = p.Owner("net1", "c1", "eth0", pod=pod, namespace="ns").label()
        assert label is not None and len(label.encode()) <= p.COMMENT_MAX
        assert ("ns/" + pod.replace("\udcff", "?")).startswith(label)  # cut on a character boundary
        assert len(label.encode()) > p.COMMENT_MAX - 4  # and no more than the last character lost
    # 122 characters but 128 bytes: too long unhashed, and hashed still too long
    with pytest.raises(p.CniError) as err:
        p.Owner("n" * 10, "c" * 104, "\u00e9" * 6).token()
    assert err.value.code == p.ERR_INVALID_ENV
    token = p.Owner("n" * 20, "c" * 95, "\u00e9" * 6).token()  # 123 characters, 129 bytes: hashed
    assert token.endswith(p.network_hash("n" * 20)) and len(token.encode()) <= p.COMMENT_MAX


def test_controller_owner_fits_what_the_daemon_takes() -> None:
    owner = p.Owner("net1", "c1", "eth0", pod="w" * 300, namespace="n" * 300).controller_owner()
    assert (owner["name"], owner["namespace"]) == ("w" * 256, "n" * 256)


@pytest.mark.parametrize("host_ip, why", [
    ("::ffff:198.51.100.1", "IPv4-mapped IPv6 address; write 198.51.100.1"),
    ("fe80::1%eth0", "has a zone"), (3232235777, "not an IP address"), ("10.0.0.1/8", "not an IP address"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
])
def test_host_ip_refused_as_the_daemon_would(host_ip: object, why: str) -> None:
    """The daemon refuses a mapped address in a spec; daemonless must refuse it too (code 7)."""
    with pytest.raises(p.CniError, match=why) as err:
        p.parse_config(conf(runtimeConfig={"portMappings": [{"hostPort": 80, "containerPort": 80,
                                                             "hostIP": host_ip}]}))
    assert err.value.code == p.ERR_INVALID_CONFIG
    with pytest.raises(ValueError, match="write 198.51.100.1"):
        parse_spec("[::ffff:198.51.100.1]:80:10.0.0.2:80")  # the same rule, in the spec grammar


@pytest.mark.parametrize("value, why", [
    (1, "must be a path"), (["/x"], "must be a path"), ("run/pp.sock", "not an absolute path"),
    ("/run/pp\0.sock", "NUL byte"), ("/" + "x" * 107, "longer than a unix socket path"),
    ("/" + "\u00e9" * 54, "longer than a unix socket path"),  # 55 characters, 109 bytes
])
def test_daemon_socket_refused(value: object, why: str) -> None:
    with pytest.raises(p.CniError, match=why) as err:
        p.parse_config(conf(daemonSocket=value))
    assert err.value.code == p.ERR_INVALID_CONFIG


def test_daemon_socket_accepted() -> None:
    for value in (None, "", "/run/portproxy/control.sock", "/" + "x" * 106):
        assert p.parse_config(conf(daemonSocket=value)).daemon_socket == value


def test_something_else_at_the_socket_path_means_daemonless(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from portproxy.cni.with_daemon import connect

    regular, fifo = tmp_path / "file", tmp_path / "fifo"
    regular.write_text("")
    os.mkfifo(fifo)
    base = p.parse_config(conf())
    for path in (regular, fifo, tmp_path):
        assert connect(str(path), base) is None
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{path} is not a socket" in err
    assert connect(str(tmp_path / "absent"), base) is None and capsys.readouterr().err == ""


def test_ls_owner_column_names_the_pods_namespace() -> None:
    from portproxy.client import format_table

    def row(spec: str, owner: dict) -> dict:
        return {"spec": spec, "mode": "kernel", "status": "running", "owner": owner}

    table = format_table([
        row("0.0.0.0:9090:10.88.0.2:80/tcp", {"kind": "cni", "id": "c1", "ifname": "eth0", "network": "n",
                                              "name": "web", "namespace": "ns1"}),
        row("0.0.0.0:9091:10.88.0.3:80/tcp", {"kind": "cni", "id": "c2", "ifname": "eth0", "network": "n",
                                              "name": "web", "namespace": "ns2"}),
        row("0.0.0.0:9092:10.88.0.4:80/tcp", {"kind": "cni", "id": "c3" * 10, "ifname": "eth0", "network": "n",
                                              "name": "db"}),
        row("0.0.0.0:9093:10.88.0.5:80/tcp", {"kind": "docker", "id": "d" * 64})])
    owners = [line.split()[3] for line in table.splitlines()[1:]]
    assert owners == ["cni:ns1/web", "cni:ns2/web", "cni:db", "docker:" + "d" * 12]


# --- conditions -------------------------------------------------------------------------------

def test_conditions_accepted() -> None:
    assert parse_conditions(["ip saddr != 10.0.0.0/8", "ip daddr 192.0.2.1 ip saddr 192.0.2.0/24"], 4) == (
        ("ip", "saddr", "!=", "10.0.0.0/8"), ("ip", "daddr", "==", "192.0.2.1/32"),
        ("ip", "saddr", "==", "192.0.2.0/24"))
    assert parse_conditions(["ip6 saddr fd00::/8"], 6) == (("ip6", "saddr", "==", "fd00::/8"),)
    assert parse_conditions(None, 4) == ()


@pytest.mark.parametrize("condition", [
    "ip saddr 1.2.3.4 accept", "tcp dport 22", "-s 1.2.3.4", "ip saddr { 1.2.3.4 }", "ip saddr",
    "ip6 saddr fd00::1", "ip saddr fd00::1", "ip saddr 1.2.3.4; flush ruleset", "meta mark 1", "",
])
def test_conditions_refused(condition: str) -> None:
    with pytest.raises(ConditionError):
        parse_conditions([condition], 4)


def test_conditions_become_per_family_guards() -> None:
    opts = KernelOptions(table=TABLE, conditions=(("ip", "saddr", "!=", "10.0.0.0/8"),))
    rules = [c["add"]["rule"] for c in builders.table_skeleton(opts) if "rule" in c.get("add", {})]
    pre = [r["expr"] for r in rules if r["chain"] == "prerouting"]
    assert len(pre) == 2
    assert {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                      "right": {"prefix": {"addr": "10.0.0.0", "len": 8}}}} in pre[0]
    assert len(pre[1]) == 3  # IPv6: nfproto, fib, jump


def test_masquerade_options() -> None:
    def masquerades(opts: KernelOptions) -> int:
        return sum(1 for c in builders.table_skeleton(opts) if c.get("add", {}).get("rule", {}).get("chain")
                   == "postrouting")

    assert masquerades(KernelOptions()) == 3
    assert masquerades(KernelOptions(masquerade_published=False)) == 0
    assert masquerades(KernelOptions(masquerade_all=True)) == 1


# --- the table's bookkeeping ---------------------------------------------------------------------

def _listing(opts: KernelOptions, *owned: tuple[str, int, str]) -> dict:
    """What ``nft -j list table`` returns for these (spec, id, owner) mappings."""
    sets: dict[str, list] = {}
    for spec, mapping_id, owner in owned:
        for name, elem in builders.mapping_elements(parse_spec(spec), mapping_id, owner, f"ns/{owner[0]}"):
            if name.startswith("id"):
                elem = [{"elem": {"val": elem[0], "counter": {"packets": 0}}}, elem[1]]
            sets.setdefault(name, []).append(elem)
    items = [{"table": {"family": "inet", "name": opts.table}}]
    items += [{"set" if not name.startswith(("id", "addr", "port")) else "map": {"name": name, "elem": elems}}
              for name, elems in sets.items()]
    return {"nftables": items}


def test_state_read_back_and_removal_keeps_shared_targets() -> None:
    opts = KernelOptions(table=TABLE)
    listing = _listing(opts, ("9090:10.88.0.2:80", 0x8000, "a eth0 n"), ("8000-8001:10.88.0.2:80-81/udp",
                                                                          0x8001, "b eth0 n"))
    state = parse_state(listing)
    assert state.present and state.owners == {0x8000 << 16: "a eth0 n", 0x8001 << 16: "b eth0 n"}
    assert state.labels == {0x8000 << 16: "ns/a", 0x8001 << 16: "ns/b"}
    assert sorted(e.key for e in state.entries) == [("tcp", 9090), ("udp", 8000), ("udp", 8001)]
    doomed, marks = state.owned_by(lambda t: t.startswith("a "))
    cmds = removal(state, doomed, marks, opts)
    names = {c["delete"]["element"]["name"] for c in cmds}
    assert names == {"id4_any", "addr4_any", "port4_any", "to_target", "to_client"}  # target stays: b uses it
    doomed, marks = state.owned_by(lambda t: True)
    assert "targets4" in {c["delete"]["element"]["name"] for c in removal(state, doomed, marks, opts)}
    assert parse_state({"nftables": []}) == State()
    assert isinstance(state.entries[0], Entry)


def test_routed_interface() -> None:
    table = ("Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
             "eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
             "cni0\t0058000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n")
    assert routed_interface(ipaddress.IPv4Address("10.0.88.7"), table) == "cni0"
    assert routed_interface(ipaddress.IPv4Address("8.8.8.8"), table) == "eth0"
    assert routed_interface(ipaddress.IPv4Address("8.8.8.8"), table.splitlines()[0]) is None


# --- the entry point, with a recording backend in place of nft ------------------------------------

class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def add(self, owner: p.Owner, mappings: list) -> None:
        self.calls.append(("add", owner.token(), [str(m) for m in mappings]))

    def remove(self, owner: p.Owner) -> None:
        self.calls.append(("remove", owner.token()))

    def check(self, owner: p.Owner, mappings: list) -> None:
        self.calls.append(("check", owner.token()))

    def gc(self, network: str, keep: set) -> int:
        self.calls.append(("gc", network, keep))
        return 0


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    monkeypatch.setattr(cni_main, "backend_for", lambda env, conf: rec)
    monkeypatch.setattr(cni_main, "_after_add", lambda *args: None)
    return rec


def run(env: dict, stdin: bytes) -> tuple[int, dict | None]:
    out = io.StringIO()
    rc = cni_main.run(env, stdin, out)
    return rc, json.loads(out.getvalue()) if out.getvalue() else None


def test_add_passes_prev_result_through(recorder: Recorder) -> None:
    rc, result = run(ENV, json.dumps(conf(prevResult=PREV_040, runtimeConfig={"portMappings": [
        {"hostPort": 80, "containerPort": 8080, "protocol": "tcp"}]})).encode())
    assert rc == 0 and result == p.result_for(PREV_040, "1.0.0")
    assert recorder.calls == [("add", "c1 eth0 net1", ["80:10.88.0.2:8080/tcp"])]


def test_commands_reach_the_backend(recorder: Recorder) -> None:
    assert run({**ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": ""}, json.dumps(conf()).encode()) == (0, None)
    assert run({**ENV, "CNI_COMMAND": "GC"}, json.dumps(conf(**{"cni.dev/valid-attachments": [
        {"containerID": "c2", "ifname": "eth0"}]})).encode()) == (0, None)
    assert recorder.calls == [("remove", "c1 eth0 net1"), ("gc", "net1", {("c2", "eth0")})]


def test_unchained_and_malformed(recorder: Recorder) -> None:
    rc, err = run(ENV, json.dumps(conf()).encode())
    assert rc == 1 and err["code"] == p.ERR_INVALID_CONFIG and "chained" in err["msg"]
    rc, err = run({**ENV, "CNI_COMMAND": "CHECK"}, json.dumps(conf()).encode())
    assert rc == 1 and "prevResult" in err["msg"]
    for stdin in (b"", b"{", b"\xff", b"null", json.dumps(conf(prevResult=[])).encode()):
        rc, err = run(ENV, stdin)
        assert rc == 1 and set(err) == {"cniVersion", "code", "msg", "details"}
    assert recorder.calls == []


def test_version_without_stdin() -> None:
    assert run({"CNI_COMMAND": "VERSION"}, b"") == (0, version_json(None))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(
        ["cniVersion", "name", "prevResult", "runtimeConfig", "portMappings", "ips", "address", "hostPort",
         "containerPort", "protocol", "hostIP", "interfaces", "snat", "conditionsV4"]), children, max_size=5),
    max_leaves=20).map(lambda v: json.dumps(v).encode())))
def test_any_stdin_gives_json_never_a_traceback(stdin: bytes) -> None:
    rec = Recorder()
    original = cni_main.backend_for, cni_main._after_add
    cni_main.backend_for, cni_main._after_add = (lambda env, conf: rec), (lambda *args: None)
    try:
        for command in ("ADD", "DEL", "CHECK", "GC", "VERSION"):
            rc, out = run({**ENV, "CNI_COMMAND": command}, stdin)
            assert rc in (0, 1)
            if rc == 1:
                assert out is not None and isinstance(out["code"], int) and out["code"] != p.ERR_INTERNAL, out
    finally:
        cni_main.backend_for, cni_main._after_add = original


def test_a_host_port_mapped_twice_is_refused() -> None:
    entries = (p.PortMapping(80, 8080, "tcp", None), p.PortMapping(80, 8081, "tcp", None))
    with pytest.raises(p.CniError, match="mapped twice"):
        p.mappings_for(entries, [ipaddress.ip_address("10.88.0.2")])
    # the same port for UDP, or on a given address, is another key
    entries = (p.PortMapping(80, 8080, "tcp", None), p.PortMapping(80, 8080, "udp", None))
    assert len(p.mappings_for(entries, [ipaddress.ip_address("10.88.0.2")])) == 2


PLUGIN = Path(sys.executable).parent / "portproxy-cni"
"""The installed plugin: the launcher shared with portproxy-docker-proxy (scripts/)."""


SHELLS = ["/bin/sh", "/bin/bash"]
"""Debian's /bin/sh is dash; the launcher must mean the same to bash (other distributions)."""


def run_plugin(path: Path | str, stdin: bytes, command: str = "VERSION", shell: str = "/bin/sh",
               args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([shell, str(path), *args], input=stdin,
                          env={"CNI_COMMAND": command, "PATH": os.environ["PATH"]}, capture_output=True, timeout=30)


def test_launcher_is_valid_python_without_warnings() -> None:
    """Its shell lines are one Python string: an escape Python does not know would warn at
    every start (3.12+) and become a syntax error later."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile(PLUGIN.read_text(), str(PLUGIN), "exec")


@pytest.mark.parametrize("stdin, requested", [
    (b'{"cniVersion":"1.0.0"}', "1.0.0"),  # libcni's exact request
    (b'{"cniVersion": "0.4.0"}', "0.4.0"),
    (b'{\n  "cniVersion" : "1.1.0"\n}\n', "1.1.0"),
    (b'\t{ "cniVersion":"1.0.0" }', "1.0.0"),
])
@pytest.mark.parametrize("shell", SHELLS)
def test_version_answered_by_the_shell_alone(stdin: bytes, requested: str, shell: str, tmp_path: Path) -> None:
    """libcni's VERSION request is answered without starting Python (a ``python3`` next to
    the launcher that only fails proves it), with exactly Python's answer."""
    shutil.copy(PLUGIN, tmp_path / "portproxy-cni")
    (tmp_path / "python3").write_text("#!/bin/sh\necho python started >&2\nexit 99\n")
    (tmp_path / "python3").chmod(0o755)
    got = run_plugin(tmp_path / "portproxy-cni", stdin, shell=shell)
    assert (got.returncode, got.stderr) == (0, b"")
    assert json.loads(got.stdout) == version_json(requested)


@pytest.mark.parametrize("stdin", [b'{"cniVersion":"0.3.1"}', b"", b'{"cniVersion":"1.0.0","x":1}', b"[]",
                                   b'{"cniVersion":"1.0.0"', b"{\\n}", b'{"cni Version":"1.0.0"}',
                                   b'{"cniVersion":"1.0 .0"}', b'{"cniVersion":"1.1.0"}x', b'{"cniVersion":"1.0.0"}\r\n'])
@pytest.mark.parametrize("shell", SHELLS)
def test_version_otherwise_answered_by_python(stdin: bytes, shell: str, tmp_path: Path) -> None:
    """Anything but the exact request goes to Python with the same stdin: same answer as
    the plugin's own ``run`` gives it, errors included."""
    got = run_plugin(PLUGIN, stdin, shell=shell)
    out = io.StringIO()
    code = cni_main.run({"CNI_COMMAND": "VERSION"}, stdin, out)
    assert (got.returncode, json.loads(got.stdout)) == (code, json.loads(out.getvalue()))
    shutil.copy(PLUGIN, tmp_path / "portproxy-cni")
    (tmp_path / "python3").write_text("#!/bin/sh\nexit 99\n")
    (tmp_path / "python3").chmod(0o755)
    assert run_plugin(tmp_path / "portproxy-cni", stdin, shell=shell).returncode == 99  # not the shell's answer


def test_arguments_mean_docker_proxy_whatever_the_environment() -> None:
    """dockerd always passes arguments, a CNI runtime never: a dockerd that inherited
    CNI_COMMAND still starts proxies."""
    got = run_plugin(PLUGIN, b'{"cniVersion":"1.0.0"}', args=("-version",))
    assert got.returncode == 0 and got.stdout.startswith(b"portproxy-docker-proxy (portproxy "), got


# --- with a daemon: socket choice, API specs, adoption (pure parts) ---------------------------------

def test_daemon_socket_choice() -> None:
    from portproxy.cni.with_daemon import socket_path
    from portproxy.defaults import DEFAULT_SOCKET

    base = p.parse_config(conf())
    env = p.parse_env(ENV)
    assert socket_path(env, base) == str(DEFAULT_SOCKET)
    env_sock = p.parse_env({**ENV, "PORTPROXY_SOCKET": "/tmp/x.sock"})
    assert socket_path(env_sock, base) == "/tmp/x.sock"
    assert socket_path(env_sock, p.parse_config(conf(daemonSocket="/srv/pp.sock"))) == "/srv/pp.sock"
    assert socket_path(env_sock, p.parse_config(conf(daemonSocket=""))) is None  # daemon mode off
    with pytest.raises(p.CniError, match="daemonSocket"):
        p.parse_config(conf(daemonSocket=1))


def test_api_mappings_publish_only_the_container_families() -> None:
    from portproxy.cni.with_daemon import api_mappings, owner_token

    entries = (p.PortMapping(80, 8080, "tcp", None), p.PortMapping(81, 8081, "tcp", ipaddress.ip_address("10.0.0.1")))
    mappings = p.mappings_for(entries, [ipaddress.ip_address("10.88.0.2"), ipaddress.ip_address("fd00::2")])
    assert [str(m) for m in api_mappings(mappings)] == [
        "0.0.0.0:80:10.88.0.2:8080/tcp", "10.0.0.1:81:10.88.0.2:8081/tcp", "[::]:80:[fd00::2]:8080/tcp"]
    owner = p.Owner("net1", "c1", "eth0", pod="web")
    assert owner_token(owner.controller_owner()) == owner.token() == "c1 eth0 net1"
    assert owner_token({"kind": "docker", "id": "c1"}) is None


def test_adoption_reads_back_what_the_plugin_wrote() -> None:
    """Every element of a mapping, as the table holds it, joins back into that mapping."""
    from portproxy.controller.adopt import mappings_of, owner_of_token
    from portproxy.cni.table import Entry, State
    from portproxy.kernel import builders
    from portproxy.spec import parse_spec

    written = {0x8000: ("c1 eth0 net1", parse_spec("0.0.0.0:10000-10002:10.88.0.2:7000-7002/tcp")),
               0x8001: ("c1 eth0 net1", parse_spec("[::]:9090:[fd00::2]:8080/udp")),
               0x8002: ("c2 eth0 net1", parse_spec("192.0.2.1:9091:10.88.0.3:8080/tcp"))}
    state = State(present=True, labels={0x8000: "ns1/web"})
    for mark, (token, m) in written.items():
        state.owners[mark] = token
        for name, key, target_port in builders.element_keys(m):
            state.entries.append(Entry(name, "", "", key, mark, str(m.target_ip), target_port, ""))
    assert mappings_of(state) == [(m, token, "ns1/web" if mark == 0x8000 else None)
                                  for mark, (token, m) in written.items()]
    assert owner_of_token("c1 eth0 net1") == {"kind": "cni", "id": "c1", "ifname": "eth0", "network": "net1"}
    assert owner_of_token("c1 eth0 net1", "ns1/web") == {"kind": "cni", "id": "c1", "ifname": "eth0",
                                                         "network": "net1", "name": "web", "namespace": "ns1"}
    assert owner_of_token("c1 eth0 net1", "web")["name"] == "web"
    assert p.Owner("net1", "c1", "eth0", pod="web", namespace="ns1").label() == "ns1/web"
    assert p.Owner("net1", "c1", "eth0").label() is None
    assert len(p.Owner("net1", "c1", "eth0", pod="w" * 300).label()) == p.COMMENT_MAX


def test_departures_commands_and_read_back() -> None:
    """The DEL-while-away table: one set of random keys whose comments are owner tokens."""
    from portproxy.cni import departures as d

    assert d.create_commands() == [{"add": {"table": {"family": "inet", "name": d.TABLE}}},
                                   {"add": {"set": {"family": "inet", "table": d.TABLE, "name": d.SET,
                                                    "type": "mark"}}}]
    (record,) = d.record_commands(7, "c1 eth0 net1")
    assert record["add"]["element"]["elem"] == [{"elem": {"val": 7, "comment": "c1 eth0 net1"}}]
    assert d.forget_commands([]) == []
    assert d.forget_commands([9, 7])[0]["delete"]["element"]["elem"] == [7, 9]
    listing = {"nftables": [{"metainfo": {}}, {"set": {"name": d.SET, "elem": [
        {"elem": {"val": 7, "comment": "c1 eth0 net1"}}, {"elem": {"val": 9, "comment": "c2 eth0 net1"}}, 11]}}]}
    assert d.parse(listing) == {7: "c1 eth0 net1", 9: "c2 eth0 net1"}
    assert d.parse({"nftables": [{"set": {"name": d.SET}}]}) == {}


def test_departed_attachments_leave_the_saved_state() -> None:
    from types import SimpleNamespace

    from portproxy.controller.adopt import drop_departed

    def entry(source: str, cid: str) -> SimpleNamespace:
        return SimpleNamespace(origin=source, owner={"kind": source, "id": cid, "ifname": "eth0", "network": "net1"})

    a, b, c = (parse_spec(f"0.0.0.0:{port}:10.88.0.2:80") for port in (9090, 9091, 9092))
    desired = {a: entry("cni", "c1"), b: entry("cni", "c2"), c: entry("docker", "c1")}
    assert drop_departed(desired, {"c1 eth0 net1"}) == [a]
    assert list(desired) == [b, c]  # another attachment's, and a Docker container's of the same id, stay
    long = {a: entry("cni", "x" * 200)}  # no token fits it: never recorded, never a crash
    assert drop_departed(long, {"c1 eth0 net1"}) == [] and list(long) == [a]


@pytest.mark.parametrize("answer, expected", [
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}", (200, b"{}")),
    (b"HTTP/1.1 409 Conflict\r\ncontent-length: 11\r\n\r\n{\"error\":1}", (409, b'{"error":1}')),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n{\"mappings\": [", "cut short"),  # the daemon died
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", "Content-Length"),
    (b"SSH-2.0-OpenSSH_9.2\r\n", "not an HTTP answer"),
    (b"", "not an HTTP answer"),
])
def test_the_plugins_http_exchange(answer: bytes, expected: tuple | str) -> None:
    """One request per connection to portproxy's own API; anything else is an OSError (CNI code 11)."""
    from portproxy.cni.with_daemon import exchange

    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(answer)
        theirs.shutdown(socket.SHUT_WR)
        if isinstance(expected, tuple):
            assert exchange(ours, "PUT", "/v1/owners/mappings", b"{}") == expected
            request = theirs.recv(4096)
            assert request.startswith(b"PUT /v1/owners/mappings HTTP/1.1\r\n") and b"Content-Length: 2\r\n" in request
        else:
            with pytest.raises(OSError, match=expected):
                exchange(ours, "GET", "/v1/mappings", None)


def test_the_plugins_http_exchange_has_one_deadline() -> None:
    """A peer trickling bytes (or silent) ends the exchange at the deadline, not per read."""
    from portproxy.cni.with_daemon import exchange

    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"HTTP/1.1 200 OK\r\n")  # and then nothing more, connection open
        with pytest.raises(TimeoutError, match="no complete answer within 0.3 s"):
            exchange(ours, "GET", "/v1/mappings", None, timeout=0.3)


def test_withdrawal_takes_exactly_the_mappings_elements_from_another_table() -> None:
    """A deleted container's DNAT leaves the absent daemon's table; another container's
    mapping of the same port (other address) and its other mappings stay."""
    from portproxy.cni.table import DAEMON, withdrawal

    listing = _listing(DAEMON, ("198.51.100.1:9090:10.88.0.2:8080", 1, "-"), ("198.51.100.2:9090:10.88.0.3:8080", 2, "-"),
                       ("9091-9092:10.88.0.2:81-82", 3, "-"))
    state = parse_state(listing)
    gone = parse_spec("198.51.100.1:9090:10.88.0.2:8080")
    cmds = withdrawal(state, [gone, parse_spec("9091:10.88.0.2:81")], DAEMON)
    deleted = {c["delete"]["element"]["name"]: c["delete"]["element"]["elem"] for c in cmds}
    assert deleted["id4_addr"] == [{"concat": ["198.51.100.1", "tcp", 9090]}]
    assert deleted["id4_any"] == [{"concat": ["tcp", 9091]}]
    assert deleted["to_target"] == [1 << 16]  # mapping 3 keeps its mark: port 9092 is still there
    assert "targets4" not in deleted  # 10.88.0.2 is still a target of 9092
    assert withdrawal(state, [parse_spec("198.51.100.1:9090:10.88.0.9:8080")], DAEMON) == []  # another target


def test_del_goes_through_port_mappings_it_would_refuse(recorder: Recorder) -> None:
    """A container ADDed by an older, laxer build (or half-refused) must still be deleted:
    DEL and GC need the owner, not the ports. ADD and CHECK keep refusing them."""
    bad = {"portMappings": [{"hostPort": 80, "containerPort": 8080, "protocol": "tcp", "hostIP": "224.0.0.1"}]}
    rc, _ = run({**ENV, "CNI_COMMAND": "DEL"}, json.dumps(conf(runtimeConfig=bad)).encode())
    assert rc == 0 and recorder.calls == [("remove", "c1 eth0 net1")]
    rc, result = run(ENV, json.dumps(conf(prevResult=PREV_040, runtimeConfig=bad)).encode())
    assert rc == 1 and result["code"] == 7 and "multicast" in result["msg"]


def test_del_goes_through_go_cased_port_mappings_it_would_refuse(recorder: Recorder) -> None:
    """The same with Go's field names, as containerd's CNI library sends them."""
    bad = {"PortMappings": [{"HostPort": 80, "ContainerPort": 8080, "Protocol": "tcp", "HostIP": "224.0.0.1"}]}
    raw = conf(runtimeConfig=bad)
    raw["RuntimeConfig"] = raw.pop("runtimeConfig")
    rc, _ = run({**ENV, "CNI_COMMAND": "DEL"}, json.dumps(raw).encode())
    assert rc == 0 and recorder.calls == [("remove", "c1 eth0 net1")]


def test_a_lock_is_held_while_its_file_names_a_live_pid(tmp_path: Path) -> None:
    """How a plugin tells a daemon's table lock is held without taking it (portproxy.lock.held)."""
    from portproxy.lock import held, release_lock, take_lock

    path = tmp_path / "nft.lock"
    assert not held(path)  # never taken
    fd = take_lock(path, "the test's table")
    assert held(path)
    release_lock(path, fd)
    assert not held(path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path.write_text(dead.stdout)
    assert not held(path)  # a crash leaves a dead pid
    path.write_text("")
    assert held(path)  # being taken: the pid comes right after the flock


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION"])
@pytest.mark.parametrize("stdin", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                                   b'{"a":' + b'{"b":' * 2000 + b"1" + b"}" * 2001])
def test_deep_nesting_is_a_decoding_error(command: str, stdin: bytes) -> None:
    rc, err = run({**ENV, "CNI_COMMAND": command}, stdin)
    assert rc == 1 and err is not None
    assert (err["code"], err["msg"]) == (p.ERR_DECODE, "failed to parse network configuration"), err
    assert "deeper than" in err["details"]


def test_nesting_up_to_the_limit_is_decoded_and_answered(recorder: Recorder) -> None:
    deep: object = 1
    for _ in range(p.MAX_DEPTH - 2):  # conf > prevResult > [...]: MAX_DEPTH levels in all
        deep = [deep]
    prev = {**PREV_040, "extra": deep}
    rc, result = run(ENV, json.dumps(conf(prevResult=prev, runtimeConfig={"portMappings": [
        {"hostPort": 80, "containerPort": 8080, "protocol": "tcp"}]})).encode())
    assert rc == 0 and result is not None and result["extra"] == deep
    too_deep = json.dumps(conf(prevResult={**PREV_040, "extra": [deep]})).encode()
    assert run(ENV, too_deep)[1]["code"] == p.ERR_DECODE  # type: ignore[index]


V4, V6 = ipaddress.ip_address("10.88.0.2"), ipaddress.ip_address("fd00::2")


@pytest.mark.parametrize("entries, addresses, words", [
    ((p.PortMapping(80, 8080, "tcp", ipaddress.ip_address("::1")),), [V4],
     "cannot publish [::1]:80/tcp: the container has no IPv6 address (only IPv4)"),
    ((p.PortMapping(80, 8080, "tcp", None), p.PortMapping(81, 8081, "udp", ipaddress.ip_address("0.0.0.0"))),
     [V6], "cannot publish 0.0.0.0:81/udp: the container has no IPv4 address (only IPv6)"),
    ((p.PortMapping(80, 8080, "tcp", None),), [], "prevResult gives the container no IP address"),
])
def test_a_mapping_that_publishes_nothing_is_refused(entries: tuple, addresses: list, words: str) -> None:
    with pytest.raises(p.CniError) as err:
        p.mappings_for(entries, addresses)
    assert err.value.code == p.ERR_INVALID_CONFIG and words in err.value.msg


def test_what_can_be_published_still_is() -> None:
    assert p.mappings_for((), []) == []  # no port mappings: nothing to publish, nothing wrong
    loopback6 = (p.PortMapping(80, 8080, "tcp", ipaddress.ip_address("::1")),)
    assert [str(m) for m in p.mappings_for(loopback6, [V4, V6])] == ["[::1]:80:[fd00::2]:8080/tcp"]
    # one entry per family for the same port, as some runtimes pass them: the missing family's is skipped
    both = (p.PortMapping(80, 8080, "tcp", ipaddress.ip_address("0.0.0.0")),
            p.PortMapping(80, 8080, "tcp", ipaddress.ip_address("::")))
    assert [str(m) for m in p.mappings_for(both, [V4])] == ["80:10.88.0.2:8080/tcp"]


@pytest.mark.parametrize("prev", [{**PREV_040, "ips": []}, {"cniVersion": "0.4.0", "interfaces": []}, {
    **PREV_100, "ips": [{"address": "10.88.0.1/16", "interface": 0}]}])  # only a host-side address
def test_an_add_without_a_container_address_is_refused(recorder: Recorder, prev: dict) -> None:
    rc, err = run(ENV, json.dumps(conf(prevResult=prev, runtimeConfig={"portMappings": [
        {"hostPort": 80, "containerPort": 8080, "protocol": "tcp"}]})).encode())
    assert rc == 1 and err is not None and err["code"] == p.ERR_INVALID_CONFIG, err
    assert recorder.calls == []
    rc, result = run(ENV, json.dumps(conf(prevResult=prev, runtimeConfig={"portMappings": []})).encode())
    assert rc == 0 and result is not None  # nothing asked: passed through


# --- keys matched as Go's encoding/json matches struct fields ---------------------------------

CONTAINERD_ID = "8cf03138b3025db45bb3a020970345eb12bc71f259ea4f9c1c5d1c9b6a3322f6"
CONTAINERD_NETNS = ("/tmp/research-cri-d12-iptables.CPcb/state/io.containerd.grpc.v1.cri/netns/"
                    "cni-d6437c3c-5db9-009b-c64f-80f8d1499912")
CONTAINERD_ENV = {
    "CNI_ARGS": f"K8S_POD_INFRA_CONTAINER_ID={CONTAINERD_ID};K8S_POD_UID=uid-0001;IgnoreUnknown=1;"
                "K8S_POD_NAMESPACE=research;K8S_POD_NAME=web-0",
    "CNI_COMMAND": "ADD", "CNI_CONTAINERID": CONTAINERD_ID, "CNI_IFNAME": "eth0", "CNI_NETNS": CONTAINERD_NETNS,
    "CNI_PATH": "/var/cache/portproxy-test/unpacked/containernetworking-plugins-93cfb6d7/usr/lib/cni"}
CONTAINERD_MAPPINGS = (
    '{"portMappings":[{"HostPort":8081,"ContainerPort":8080,"Protocol":"tcp","HostIP":""},'
    '{"HostPort":8082,"ContainerPort":8080,"Protocol":"tcp","HostIP":"127.0.0.1"},'
    '{"HostPort":5354,"ContainerPort":5353,"Protocol":"udp","HostIP":""}]}')
CONTAINERD_PREV = (
    '{"cniVersion":"1.0.0","interfaces":[{"mac":"a2:4f:ea:51:dd:56","name":"cni-research0"},'
    '{"mac":"f2:bb:32:24:6d:57","name":"veth08880112"},{"mac":"ee:e3:64:ff:41:fc","name":"eth0","sandbox":"'
    + CONTAINERD_NETNS + '"}],"ips":[{"address":"10.97.0.2/24","gateway":"10.97.0.1","interface":2}],'
    '"routes":[{"dst":"0.0.0.0/0"}]}')
CONTAINERD_ADD = (
    '{"capabilities":{"portMappings":true},"cniVersion":"1.0.0","name":"research-cri","prevResult":'
    + CONTAINERD_PREV + ',"runtimeConfig":' + CONTAINERD_MAPPINGS + ',"type":"portmap-tee"}').encode()
"""containerd 2.1.9's CRI (go-cni, whose PortMapping struct has no json tags) to a chained
plugin, byte for byte as captured on ADD and on the first DEL (StopPodSandbox)."""
CONTAINERD_DEL_AGAIN = (
    '{"capabilities":{"portMappings":true},"cniVersion":"1.0.0","name":"research-cri","runtimeConfig":'
    + CONTAINERD_MAPPINGS + ',"type":"portmap-tee"}').encode()
"""The second DEL (RemovePodSandbox): no prevResult, and ``CNI_NETNS`` empty."""
LOWERCASE_MAPPINGS = [{"hostPort": 8081, "containerPort": 8080, "protocol": "tcp", "hostIP": ""},
                      {"hostPort": 8082, "containerPort": 8080, "protocol": "tcp", "hostIP": "127.0.0.1"},
                      {"hostPort": 5354, "containerPort": 5353, "protocol": "udp", "hostIP": ""}]


def test_containerds_capitalised_port_mappings_read_as_the_lowercase_ones() -> None:
    raw = p.decode(CONTAINERD_ADD)
    lower = {**raw, "runtimeConfig": {"portMappings": LOWERCASE_MAPPINGS}}
    assert p.parse_config(raw) == p.parse_config(lower)
    assert p.parse_config(raw).port_mappings == (
        p.PortMapping(8081, 8080, "tcp", None), p.PortMapping(8082, 8080, "tcp", ipaddress.ip_address("127.0.0.1")),
        p.PortMapping(5354, 5353, "udp", None))


def test_containerds_add_del_del_answered(recorder: Recorder) -> None:
    token = f"{CONTAINERD_ID} eth0 research-cri"
    rc, result = run(CONTAINERD_ENV, CONTAINERD_ADD)
    assert rc == 0 and result == p.result_for(json.loads(CONTAINERD_PREV), "1.0.0")
    assert recorder.calls == [("add", token, ["8081:10.97.0.2:8080/tcp", "127.0.0.1:8082:10.97.0.2:8080/tcp",
                                              "5354:10.97.0.2:5353/udp"])]
    assert run({**CONTAINERD_ENV, "CNI_COMMAND": "DEL"}, CONTAINERD_ADD) == (0, None)
    assert run({**CONTAINERD_ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": ""}, CONTAINERD_DEL_AGAIN) == (0, None)
    assert recorder.calls[1:] == [("remove", token), ("remove", token)]


@pytest.mark.parametrize("stdin, port", [
    (b'{"hostPort": 1, "HostPort": 2}', 2), (b'{"HostPort": 2, "hostPort": 1}', 1),
    (b'{"HOSTPORT": 1, "hostport": 2}', 2),
    (b'{"hostPort": 1, "HostPort": 2, "hostPort": 3}', 3),  # a repeated key counts at its last place
    (b'{"HostPort": 2, "hostPort": 1, "HostPort": 4}', 4),
])
def test_keys_of_one_field_the_last_wins_as_in_go(stdin: bytes, port: int) -> None:
    """Go assigns the fields in document order, so of several keys matching one field the
    last wins, exact or not (golang/go#43664: {"dist": "ok", "Dist": "KO"} gives KO)."""
    entry = {**p.decode(stdin), "containerPort": 80}
    assert p.parse_config(conf(runtimeConfig={"portMappings": [entry]})).port_mappings[0].host_port == port


def test_go_folding_reaches_ascii_names_only_by_simple_folds() -> None:
    assert p.go_key({"ho\u017ftPort": 1}, "hostPort") == "ho\u017ftPort"  # long s folds with S
    assert p.go_key({"bac\u212aend": 1}, "backend") == "bac\u212aend"  # the Kelvin sign folds with K
    with pytest.raises(p.CniError, match="backend 'iptables'") as err:
        p.parse_config(conf(**{"bac\u212aend": "iptables"}))
    assert err.value.code == p.ERR_UNSUPPORTED_FIELD
    for key in ("hostIp\u0307", "host\u0130P", "host\u0131P", "HOST\u0131P", "hostIPs", "hostI", "host_IP", "host-ip"):
        assert p.go_key({key: "127.0.0.1"}, "hostIP") is None, key  # no simple fold, or another name
    assert p.go_key({"addreß": 1}, "address") is None  # full case mapping (ß to SS) is not Go's
    assert p.go_key({}, "hostIP") is None and p.go_get({}, "hostIP", 7) == 7


@pytest.mark.parametrize("entry", [{"port": 8081}, {"host_port": 8081}, {"hostPorts": 8081}, {"HostPortt": 8081},
                                   {"Host Port": 8081}, {}])
def test_a_key_that_matches_nothing_is_still_missing(entry: dict) -> None:
    with pytest.raises(p.CniError) as err:
        p.parse_config(conf(runtimeConfig={"PortMappings": [{**entry, "ContainerPort": 8080}]}))
    assert (err.value.code, err.value.msg) == (
        p.ERR_INVALID_CONFIG, "runtimeConfig.portMappings[0].hostPort must be a port number 1-65535, not None")


def test_every_field_portmap_decodes_is_matched_as_go_does() -> None:
    """The netconf (types.NetConf and portmap's PortMapConf), runtimeConfig, its entries and
    the prevResult (types/100.Result, Interface, IPConfig), all spelt otherwise."""
    prev = {"CNIVersion": "0.4.0", "Interfaces": [{"NAME": "eth0", "Sandbox": "/run/netns/x"}],
            "IPs": [{"Version": "4", "Address": "10.88.0.2/16", "Interface": 0}], "DNS": {}}
    upper = {"CNIVersion": "1.0.0", "NAME": "net1", "Type": "portproxy-cni", "PrevResult": prev,
             "RuntimeConfig": {"PortMappings": [{"HostPort": 80, "ContainerPort": 8080, "Protocol": "UDP",
                                                 "HostIP": "10.0.0.1"}]},
             "SNAT": False, "MasqALL": True, "ConditionsV4": ["ip saddr 10.0.0.0/8"], "conditionsv6": ["ip6 daddr ::1"],
             "DaemonSocket": "", "CNI.dev/Valid-Attachments": [{"ContainerId": "c2", "IfName": "eth1"}]}
    c = p.parse_config(upper)
    assert c == p.parse_config({
        "cniVersion": "1.0.0", "name": "net1", "type": "portproxy-cni", "prevResult": prev,
        "runtimeConfig": {"portMappings": [{"hostPort": 80, "containerPort": 8080, "protocol": "UDP",
                                            "hostIP": "10.0.0.1"}]},
        "snat": False, "masqAll": True, "conditionsV4": ["ip saddr 10.0.0.0/8"], "conditionsV6": ["ip6 daddr ::1"],
        "daemonSocket": "", "cni.dev/valid-attachments": [{"containerID": "c2", "ifname": "eth1"}]})
    assert (c.name, c.snat, c.masq_all, c.daemon_socket, c.valid_attachments) == ("net1", False, True, "",
                                                                                  (("c2", "eth1"),))
    assert len(c.conditions) == 2 and c.port_mappings == (p.PortMapping(80, 8080, "udp",
                                                                        ipaddress.ip_address("10.0.0.1")),)
    assert p.container_addresses(prev, "eth0") == [ipaddress.ip_address("10.88.0.2")]
    for key in ("externalsetmarkchain", "Backend"):
        with pytest.raises(p.CniError) as err:
            p.parse_config({**upper, key: "iptables"})
        assert err.value.code == p.ERR_UNSUPPORTED_FIELD
    with pytest.raises(p.CniError, match="incompatible CNI version 9.9.9"):
        p.parse_config({**upper, "cniversion": "9.9.9"})  # after CNIVersion: the last wins


def test_the_passed_through_result_spells_the_keys_it_rewrites_as_go_writes_them() -> None:
    prev = {"CNIVersion": "0.4.0", "IPs": [{"Version": "4", "Address": "10.88.0.2/16", "Interface": 0}],
            "Interfaces": [{"Name": "eth0"}]}
    assert p.result_for(prev, "1.0.0") == {"cniVersion": "1.0.0", "ips": [{"Address": "10.88.0.2/16", "Interface": 0}],
                                           "Interfaces": [{"Name": "eth0"}]}
    assert p.result_for(prev, "0.4.0")["ips"] == [{"Address": "10.88.0.2/16", "Interface": 0, "version": "4"}]
