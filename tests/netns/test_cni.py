"""portproxy-cni against the real counterparts: Debian's ``bridge`` + ``host-local`` invoked per
the CNI spec, with Debian's stock ``portmap`` run through the same cases as the reference.

Every test builds its own namespaces (the demo topology's host and client, plus one namespace per
container that ``bridge`` plugs in), runs the plugins in the host namespace as a runtime
would, and sends traffic only inside them. The root namespace's links, routes and nft
ruleset are compared before and after each test.
"""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest

from portproxy.lab.namespaces import Namespace
from portproxy.lab.topology import DemoTopology
from tests.support.cni import (WEB, Servers, addresses, ask_tcp, ask_udp, cache, check_stale_udp_flow_flushed,  # noqa: F401
                               container, make_chain, root_unchanged, topo)
from tests.support.cni_testbed import Chain

MAPPERS = ["portmap", "portproxy-cni"]
VERSIONS = ["0.4.0", "1.0.0"]


@pytest.fixture(params=MAPPERS)
def mapper(request: pytest.FixtureRequest) -> str:
    return request.param


PORTMAP_CHECK_BUG = "could not check ipv6 dnat"
"""Debian's portmap 1.1.1 CHECK looks for the IPv4 rules among the ip6tables ones and fails for
every dual-stack container (containernetworking/plugins#819, fixed after 1.1.1)."""


def assert_check_passes(chain: Chain, container_id: str, ns: Namespace, port_mappings: list[dict]) -> None:
    got = chain.check(container_id, ns.name, port_mappings)
    if chain.mapper == "portmap" and PORTMAP_CHECK_BUG in got.stdout:
        return  # the reference's known bug, not a verdict on the mappings
    assert (got.rc, got.stdout) == (0, ""), got


# --- the cases ----------------------------------------------------------------------------------

def test_version_probe(topo: DemoTopology, cache: Path, tmp_path: Path, mapper: str) -> None:
    chain = make_chain(topo, cache, tmp_path, mapper)
    got = chain.invoke(mapper, {**chain.env("VERSION"), "CNI_NETNS": "dummy", "CNI_IFNAME": "dummy"},
                       '{"cniVersion":"1.0.0"}')
    assert got.rc == 0, got
    assert {"0.4.0", "1.0.0"} <= set(got.json["supportedVersions"])


@pytest.mark.parametrize("version", VERSIONS)
def test_publish_check_delete(topo: DemoTopology, cache: Path, tmp_path: Path, mapper: str, version: str) -> None:
    chain = make_chain(topo, cache, tmp_path, mapper, version)
    web, other = container(topo), container(topo)
    result = chain.add("ctr-web", web.name, WEB)
    assert result["cniVersion"] == version
    assert all(("version" in ip) == (version == "0.4.0") for ip in result["ips"])
    ip4, ip6 = addresses(result)
    other_result = chain.add("ctr-other", other.name, [])
    other_ip4, _ = addresses(other_result)
    servers = Servers(web, "web", [8080], [5353])
    try:
        assert_check_passes(chain, "ctr-web", web, WEB)
        gateway = topo.host_ip
        # from outside, both families
        assert ask_tcp(topo.client, topo.host_ip, 9090) == f"web {topo.client_ip}"
        assert ask_tcp(topo.client, topo.host_ip6, 9090) == f"web {topo.client_ip6}"
        assert ask_udp(topo.client, topo.host_ip, 9053) == f"web {topo.client_ip}"
        # from the host itself: loopback and its own address (masqueraded to the bridge's address)
        assert ask_tcp(topo.host, "127.0.0.1", 9090).startswith("web ")
        assert ask_tcp(topo.host, gateway, 9090).startswith("web ")
        # hairpin: the container reaching its own published port, and another container
        assert ask_tcp(web, gateway, 9090).startswith("web ")
        assert ask_tcp(web, gateway, 9090) != f"web {ip4}"
        assert ask_tcp(other, gateway, 9090).startswith("web ")
        assert other_ip4 and ip6
    finally:
        servers.close()
    chain.delete("ctr-web", web.name, WEB)
    assert ask_tcp(topo.client, topo.host_ip, 9090) == "ConnectionRefusedError"
    assert ask_tcp(topo.host, "127.0.0.1", 9090) == "ConnectionRefusedError"
    chain.delete("ctr-other", other.name, [])


def test_delete_is_idempotent(topo: DemoTopology, cache: Path, tmp_path: Path, mapper: str) -> None:
    chain = make_chain(topo, cache, tmp_path, mapper)
    web = container(topo)
    chain.add("ctr-web", web.name, WEB)
    chain.delete("ctr-web", web.name, WEB)
    # again, then with neither prevResult nor netns (the container is gone)
    chain.delete("ctr-web", web.name, WEB)
    got = chain.mapper_call("DEL", "ctr-web", "", WEB)
    assert (got.rc, got.stdout) == (0, ""), got
    got = chain.mapper_call("DEL", "never-added", "", WEB)
    assert (got.rc, got.stdout) == (0, ""), got


def test_two_containers_with_ranges(topo: DemoTopology, cache: Path, tmp_path: Path, mapper: str) -> None:
    chain = make_chain(topo, cache, tmp_path, mapper)
    a, b = container(topo), container(topo)
    ranges = {
        "a": [{"hostPort": 10000 + i, "containerPort": 8000 + i, "protocol": "tcp"} for i in range(11)],
        "b": [{"hostPort": 10020 + i, "containerPort": 8000 + i, "protocol": "tcp"} for i in range(11)],
    }
    chain.add("ctr-a", a.name, ranges["a"])
    chain.add("ctr-b", b.name, ranges["b"])
    servers = [Servers(a, "a", list(range(8000, 8011)), []), Servers(b, "b", list(range(8000, 8011)), [])]
    try:
        for i in range(11):
            assert ask_tcp(topo.client, topo.host_ip, 10000 + i) == f"a {topo.client_ip}"
            assert ask_tcp(topo.client, topo.host_ip, 10020 + i) == f"b {topo.client_ip}"
        chain.delete("ctr-a", a.name, ranges["a"])
        assert_check_passes(chain, "ctr-b", b, ranges["b"])
        for i in range(11):
            assert ask_tcp(topo.client, topo.host_ip, 10000 + i) == "ConnectionRefusedError"
            assert ask_tcp(topo.client, topo.host_ip, 10020 + i) == f"b {topo.client_ip}"
    finally:
        for s in servers:
            s.close()
    chain.delete("ctr-b", b.name, ranges["b"])


def test_stale_udp_flow_flushed_on_add(topo: DemoTopology, cache: Path, tmp_path: Path, mapper: str) -> None:
    """A client that sent to the port before it was published gets through from the same source port."""
    check_stale_udp_flow_flushed(topo, make_chain(topo, cache, tmp_path, mapper))


def test_unchained_add_refused(topo: DemoTopology, cache: Path, tmp_path: Path, mapper: str) -> None:
    chain = make_chain(topo, cache, tmp_path, mapper)
    web = container(topo)
    got = chain.mapper_call("ADD", "ctr-web", web.name, WEB)
    assert got.rc != 0
    assert "chained" in got.json["msg"] and isinstance(got.json["code"], int)


MALFORMED = [b"", b"{", b"[]", b'{"cniVersion": "1.0.0", "name": "x", "type": "t", "prevResult": {"ips": []},'
                                 b' "runtimeConfig": {"portMappings": [{"hostPort": "http"}]}}']


@pytest.mark.parametrize("stdin", MALFORMED, ids=["empty", "truncated", "array", "bad-port"])
def test_malformed_stdin(topo: DemoTopology, cache: Path, tmp_path: Path, mapper: str, stdin: bytes) -> None:
    chain = make_chain(topo, cache, tmp_path, mapper)
    web = container(topo)
    got = chain.invoke(mapper, chain.env("ADD", "ctr-web", web.name), stdin)
    assert got.rc != 0
    assert isinstance(got.json["code"], int) and got.json["msg"], got
    assert "Traceback" not in got.stderr + got.stdout


def test_gc_and_status(topo: DemoTopology, cache: Path, tmp_path: Path, mapper: str) -> None:
    if mapper == "portmap":
        pytest.skip("Debian's portmap 1.1.1 implements CNI up to 1.0.0: it has no GC or STATUS")
    chain = make_chain(topo, cache, tmp_path, mapper, "1.1.0")
    chain_bridge_version = make_chain(topo, cache, tmp_path / "b", mapper, "1.0.0")  # bridge 1.1.1 predates 1.1.0
    a, b = container(topo), container(topo)
    for cid, ns, port in (("ctr-a", a, 9090), ("ctr-b", b, 9091)):
        result = chain_bridge_version.add(cid, ns.name, [{"hostPort": port, "containerPort": 8080, "protocol": "tcp"}])
        chain.results[cid] = result
    status = chain.invoke(mapper, chain.env("STATUS"), json.dumps(chain.conf(chain.mapper_entry())))
    assert (status.rc, status.stdout) == (0, ""), status
    servers = [Servers(a, "a", [8080], []), Servers(b, "b", [8080], [])]
    try:
        gc = chain.conf(chain.mapper_entry())
        gc["cni.dev/valid-attachments"] = [{"containerID": "ctr-b", "ifname": "eth0"}]
        got = chain.invoke(mapper, chain.env("GC"), json.dumps(gc))
        assert (got.rc, got.stdout) == (0, ""), got
        assert ask_tcp(topo.client, topo.host_ip, 9090) == "ConnectionRefusedError"
        assert ask_tcp(topo.client, topo.host_ip, 9091) == f"b {topo.client_ip}"
        port = {"ctr-a": 9090, "ctr-b": 9091}
        checks = {cid: chain.check(cid, ns.name, [{"hostPort": port[cid], "containerPort": 8080, "protocol": "tcp"}])
                  for cid, ns in (("ctr-a", a), ("ctr-b", b))}
        assert (checks["ctr-b"].rc, checks["ctr-a"].rc, checks["ctr-a"].json["code"]) == (0, 1, 100)
        # a GC for another network name leaves this network's mappings alone
        gc["name"], gc["cni.dev/valid-attachments"] = "elsewhere", []
        assert chain.invoke(mapper, chain.env("GC"), json.dumps(gc)).rc == 0
        assert ask_tcp(topo.client, topo.host_ip, 9091) == f"b {topo.client_ip}"
    finally:
        for s in servers:
            s.close()


def test_port_clash_refused_and_table_removed_with_last_mapping(topo: DemoTopology, cache: Path,
                                                                tmp_path: Path) -> None:
    """portproxy-cni only: portmap is last-write-wins; portproxy refuses a port another attachment holds."""
    chain = make_chain(topo, cache, tmp_path, "portproxy-cni")
    a, b = container(topo), container(topo)
    chain.add("ctr-a", a.name, WEB)
    with pytest.raises(AssertionError, match="already published"):
        chain.add("ctr-b", b.name, WEB[:1])
    chain.delete("ctr-b", b.name, WEB[:1])  # a failed ADD is followed by a DEL, per the spec
    # an all-addresses mapping and one on a given address of the same port clash too
    with pytest.raises(AssertionError, match="already published"):
        chain.add("ctr-b", b.name, [{**WEB[0], "hostIP": topo.host_ip}])
    chain.delete("ctr-b", b.name, WEB[:1])
    tables = subprocess.run(["ip", "netns", "exec", topo.host.name, "nft", "list", "tables"],
                            capture_output=True, text=True, check=True).stdout
    assert "portproxy_cni" in tables
    chain.delete("ctr-a", a.name, WEB)
    tables = subprocess.run(["ip", "netns", "exec", topo.host.name, "nft", "list", "tables"],
                            capture_output=True, text=True, check=True).stdout
    assert "portproxy_cni" not in tables


def test_host_ip_restricts_the_mapping(topo: DemoTopology, cache: Path, tmp_path: Path, mapper: str) -> None:
    """``hostIP`` publishes on that address only; the other family's container address is skipped."""
    chain = make_chain(topo, cache, tmp_path, mapper)
    web = container(topo)
    pm = [{"hostPort": 9090, "containerPort": 8080, "protocol": "tcp", "hostIP": topo.host_ip}]
    chain.add("ctr-web", web.name, pm)
    servers = Servers(web, "web", [8080], [])
    try:
        assert ask_tcp(topo.client, topo.host_ip, 9090) == f"web {topo.client_ip}"
        assert ask_tcp(topo.client, topo.bridge_ip, 9090) == "ConnectionRefusedError"
        assert ask_tcp(topo.client, topo.host_ip6, 9090) == "ConnectionRefusedError"
    finally:
        servers.close()
    chain.delete("ctr-web", web.name, pm)


def test_conditions_limit_who_is_served(topo: DemoTopology, cache: Path, tmp_path: Path) -> None:
    """portproxy-cni's nft conditions (portmap 1.1.1 takes iptables arguments here, another grammar)."""
    chain = make_chain(topo, cache, tmp_path, "portproxy-cni",
                       mapper_conf={"conditionsV4": [f"ip saddr != {topo.client_ip}/32"]})
    web = container(topo)
    chain.add("ctr-web", web.name, WEB[:1])
    servers = Servers(web, "web", [8080], [])
    try:
        assert ask_tcp(topo.client, topo.host_ip, 9090) == "ConnectionRefusedError"
        assert ask_tcp(topo.client, topo.host_ip6, 9090) == f"web {topo.client_ip6}"
        assert ask_tcp(topo.host, "127.0.0.1", 9090).startswith("web ")
    finally:
        servers.close()
    refused = chain.mapper_call("ADD", "ctr-x", web.name, WEB[:1], chain.results["ctr-web"],
                                extra={"conditionsV4": ["ip saddr 10.0.0.0/8 accept"]})
    assert refused.rc == 1 and refused.json["code"] == 7 and "not supported" in refused.json["msg"], refused


def test_concurrent_adds_keep_every_mapping(topo: DemoTopology, cache: Path, tmp_path: Path) -> None:
    """Runtimes start containers in parallel: the per-namespace lock serialises read-then-write."""
    chain = make_chain(topo, cache, tmp_path, "portproxy-cni")
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "/x"}],
            "ips": [{"address": "10.88.7.200/24", "interface": 0}]}
    jobs = {f"ctr-{i}": [{"hostPort": 11000 + 10 * i + j, "containerPort": 80 + j, "protocol": "tcp"}
                         for j in range(5)] for i in range(8)}
    results: dict[str, object] = {}
    threads = [threading.Thread(target=lambda cid=cid, pm=pm: results.__setitem__(
        cid, chain.mapper_call("ADD", cid, topo.container.name, pm, prev))) for cid, pm in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.rc == 0 for r in results.values()), results  # type: ignore[attr-defined]
    for cid, pm in jobs.items():
        got = chain.mapper_call("CHECK", cid, topo.container.name, pm, prev)
        assert (got.rc, got.stdout) == (0, ""), got


@pytest.mark.parametrize("options", [{"masqAll": True}, {"snat": False}], ids=["masqAll", "no-snat"])
def test_masquerade_options(topo: DemoTopology, cache: Path, tmp_path: Path, options: dict) -> None:
    """portproxy-cni only (Debian's portmap 1.1.1 has no masqAll): masqAll hides every client
    behind the bridge's address; without snat nothing is masqueraded and loopback is not served."""
    chain = make_chain(topo, cache, tmp_path, "portproxy-cni", mapper_conf=options)
    web = container(topo)
    result = chain.add("ctr-web", web.name, WEB[:1])
    gateway = next(ip["gateway"] for ip in result["ips"] if ":" not in ip["address"])
    servers = Servers(web, "web", [8080], [])
    try:
        if options.get("masqAll"):
            assert ask_tcp(topo.client, topo.host_ip, 9090) == f"web {gateway}"
            assert ask_tcp(topo.host, "127.0.0.1", 9090) == f"web {gateway}"
        else:
            assert ask_tcp(topo.client, topo.host_ip, 9090) == f"web {topo.client_ip}"
            assert ask_tcp(topo.host, "127.0.0.1", 9090) == "ConnectionRefusedError"
    finally:
        servers.close()


def plugin_of_this_tree(chain: Chain) -> None:
    """Make the chain's ``portproxy-cni`` run the portproxy package this test imported (the
    installed launcher runs the editable install's tree, which may be another checkout)."""
    import shlex
    import sys

    import portproxy

    root = Path(portproxy.__file__).resolve().parent.parent
    plugin = chain.plugins / "portproxy-cni"
    plugin.unlink()
    code = f"import sys; sys.path.insert(0, {str(root)!r}); from portproxy.cni.main import main; main()"
    plugin.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -I -c {shlex.quote(code)}\n")
    plugin.chmod(0o755)


@pytest.mark.parametrize("with_daemon", [False, True], ids=["daemonless", "daemon"])
def test_an_add_that_would_publish_nothing_is_refused(topo: DemoTopology, cache: Path, tmp_path: Path,
                                                      with_daemon: bool) -> None:
    """A hostIP of a family the container lacks, or a prevResult without an address: code 7
    (the same input always fails), nothing published, for the plugin's table and the daemon."""
    daemon = None
    if with_daemon:
        from test_cni_daemon import Daemon, chain_for

        (tmp_path / "d").mkdir()
        daemon = Daemon(topo, tmp_path / "d")
        daemon.start()
        chain = chain_for(topo, cache, tmp_path, daemon)
    else:
        chain = make_chain(topo, cache, tmp_path, "portproxy-cni")
    plugin_of_this_tree(chain)
    web = container(topo)
    try:
        full = chain.add("ctr-web", web.name, [])
        ipv4_only = {**full, "ips": [ip for ip in full["ips"] if ":" not in ip["address"]]}
        loopback6 = [{"hostPort": 9090, "containerPort": 8080, "protocol": "tcp", "hostIP": "::1"}]
        cases = [(loopback6, ipv4_only, "[::1]:9090/tcp: the container has no IPv6 address (only IPv4)"),
                 (WEB, {**full, "ips": []}, "prevResult gives the container no IP address"),
                 (WEB, {key: value for key, value in full.items() if key != "ips"}, "no IP address")]
        for port_mappings, prev, words in cases:
            got = chain.mapper_call("ADD", "ctr-x", web.name, port_mappings, prev)
            assert (got.rc, got.json["code"]) == (1, 7) and words in got.json["msg"], got
            chain.mapper_call("DEL", "ctr-x", web.name, port_mappings, prev)  # per the spec, after a failed ADD
        assert ask_tcp(topo.host, "::1", 9090) == "ConnectionRefusedError"
        tables = subprocess.run(["ip", "netns", "exec", topo.host.name, "nft", "list", "tables"],
                                capture_output=True, text=True, check=True).stdout
        assert "portproxy_cni" not in tables
        if daemon is not None:
            assert daemon.ls() == []
    finally:
        chain.delete("ctr-web", web.name, [])
        if daemon is not None:
            daemon.stop()
