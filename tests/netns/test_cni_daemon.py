"""portproxy-cni with a running ``portproxy serve`` (the plugin's "with a daemon" mode): it
registers the container's mappings with the daemon, and a daemon starting later adopts
what the plugin installed without it.

Same testbed as tests/netns/test_cni.py (Debian's ``bridge`` + ``host-local`` invoked per the CNI
spec, each container in a namespace of its own), plus a real ``portproxy serve`` in the
runtime's ("host") namespace with its socket and state under the test's temp dir; the
network configuration names that socket with ``daemonSocket``.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.cni_testbed import Chain
from portproxy.lab.topology import DemoTopology
from tests.support.cni import (DAEMON_CONFIG, WEB, Daemon, Servers, addresses, ask_tcp, ask_udp, cache,  # noqa: F401
                               check_stale_udp_flow_flushed, container, make_chain, root_unchanged, topo)


@pytest.fixture
def daemon(topo: DemoTopology, tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(topo, tmp_path)
    yield d
    d.stop()


def chain_for(topo: DemoTopology, cache: Path, tmp_path: Path, daemon: Daemon) -> Chain:
    return make_chain(topo, cache, tmp_path, "portproxy-cni", mapper_conf={"daemonSocket": str(daemon.socket)})


def cni_table(topo: DemoTopology, name: str = "portproxy_cni") -> bool:
    tables = subprocess.run(["ip", "netns", "exec", topo.host.name, "nft", "list", "tables"],
                            capture_output=True, text=True, check=True).stdout
    return f"table inet {name}" in tables.splitlines()


def departures(topo: DemoTopology) -> list[str]:
    """The owner tokens recorded in the DEL-while-away table (see portproxy.cni.departures)."""
    from portproxy.cni import departures as words

    got = subprocess.run(["ip", "netns", "exec", topo.host.name, "nft", "-j", "list", "set", "inet", words.TABLE,
                          words.SET], capture_output=True, text=True, check=True).stdout
    return sorted(words.parse(json.loads(got)).values())


def owned(mappings: list[dict], cid: str) -> list[dict]:
    return [m for m in mappings if (m.get("owner") or {}).get("id") == cid]


# --- the cases ----------------------------------------------------------------------------------

def test_add_check_delete_through_the_daemon(topo: DemoTopology, cache: Path, tmp_path: Path,
                                             daemon: Daemon) -> None:
    daemon.start()
    chain = chain_for(topo, cache, tmp_path, daemon)
    web, other = container(topo), container(topo)
    ip4, ip6 = addresses(chain.add("ctr-web", web.name, WEB))
    chain.add("ctr-other", other.name, [])
    listed = daemon.ls()
    assert sorted(m["spec"] for m in listed) == sorted([
        f"0.0.0.0:9090:{ip4}:8080/tcp", f"[::]:9090:[{ip6}]:8080/tcp",
        f"0.0.0.0:9053:{ip4}:5353/udp", f"[::]:9053:[{ip6}]:5353/udp"])
    for m in listed:
        assert (m["source"], m["mode"], m["status"]) == ("cni", "kernel", "running"), m
        assert m["owner"] == {"kind": "cni", "id": "ctr-web", "ifname": "eth0", "network": "pptest", "name": "web"}
        assert m["families"] == {"ipv6" if "[::]" in m["spec"] else "ipv4": "kernel"}
        assert m["userland"]["listening"] == []  # DNAT only: the runtime holds the host ports
    assert not cni_table(topo)
    servers = Servers(web, "web", [8080], [5353])
    try:
        assert ask_tcp(topo.client, topo.host_ip, 9090) == f"web {topo.client_ip}"
        assert ask_tcp(topo.client, topo.host_ip6, 9090) == f"web {topo.client_ip6}"
        assert ask_udp(topo.client, topo.host_ip, 9053) == f"web {topo.client_ip}"
        assert ask_tcp(topo.host, "127.0.0.1", 9090).startswith("web ")
        assert ask_tcp(topo.host, topo.host_ip, 9090).startswith("web ")
        assert ask_tcp(web, topo.host_ip, 9090).startswith("web ")  # hairpin, masqueraded
        assert ask_tcp(web, topo.host_ip, 9090) != f"web {ip4}"
        assert ask_tcp(other, topo.host_ip, 9090).startswith("web ")
        got = chain.check("ctr-web", web.name, WEB)
        assert (got.rc, got.stdout) == (0, ""), got
        metrics = daemon.metrics()
        assert 'listen="0.0.0.0:9090"' in metrics and f'target="{ip4}:8080"' in metrics
    finally:
        servers.close()
    chain.delete("ctr-web", web.name, WEB)
    assert owned(daemon.ls(), "ctr-web") == []
    assert ask_tcp(topo.client, topo.host_ip, 9090) == "ConnectionRefusedError"
    chain.delete("ctr-web", web.name, WEB)  # again
    got = chain.mapper_call("DEL", "ctr-web", "", WEB)  # neither prevResult nor netns
    assert (got.rc, got.stdout) == (0, ""), got
    chain.delete("ctr-other", other.name, [])


def test_restart_gc_and_independent_deletes(topo: DemoTopology, cache: Path, tmp_path: Path,
                                            daemon: Daemon) -> None:
    daemon.start()
    chain = chain_for(topo, cache, tmp_path, daemon)
    ports = {"ctr-a": 9090, "ctr-b": 9091, "ctr-c": 9092}
    spaces = {cid: container(topo) for cid in ports}
    pm = {cid: [{"hostPort": port, "containerPort": 8080, "protocol": "tcp"}] for cid, port in ports.items()}
    for cid, ns in spaces.items():
        chain.add(cid, ns.name, pm[cid])
    servers = [Servers(ns, cid, [8080], []) for cid, ns in spaces.items()]
    try:
        daemon.stop()
        daemon.procs.clear()
        daemon.start()
        assert {m["owner"]["id"] for m in daemon.ls() if m["status"] == "running"} == set(ports)
        for cid, port in ports.items():
            assert ask_tcp(topo.client, topo.host_ip, port) == f"{cid} {topo.client_ip}"
        chain.delete("ctr-a", spaces["ctr-a"].name, pm["ctr-a"])
        assert ask_tcp(topo.client, topo.host_ip, 9090) == "ConnectionRefusedError"
        assert ask_tcp(topo.client, topo.host_ip, 9091) == f"ctr-b {topo.client_ip}"
        got = chain.check("ctr-b", spaces["ctr-b"].name, pm["ctr-b"])
        assert (got.rc, got.stdout) == (0, ""), got
        gc = chain.conf(chain.mapper_entry())
        gc["cniVersion"] = "1.1.0"
        gc["cni.dev/valid-attachments"] = [{"containerID": "ctr-b", "ifname": "eth0"}]
        got = chain.invoke("portproxy-cni", chain.env("GC"), json.dumps(gc))
        assert (got.rc, got.stdout) == (0, ""), got
        assert {m["owner"]["id"] for m in daemon.ls()} == {"ctr-b"}
        assert ask_tcp(topo.client, topo.host_ip, 9092) == "ConnectionRefusedError"
        assert ask_tcp(topo.client, topo.host_ip, 9091) == f"ctr-b {topo.client_ip}"
        got = chain.check("ctr-c", spaces["ctr-c"].name, pm["ctr-c"])
        assert (got.rc, json.loads(got.stdout)["code"]) == (1, 100), got
    finally:
        for s in servers:
            s.close()


def test_a_delete_while_the_daemon_is_away_reaches_it(topo: DemoTopology, cache: Path, tmp_path: Path,
                                                     daemon: Daemon) -> None:
    """A container deleted while the daemon is stopped, or crashed (its socket dead), loses its
    DNAT at once and does not come back with the daemon: it would reach whoever has that
    address next. The daemon keeps its rules while stopped (as the DaemonSet does)."""
    daemon.config.write_text(DAEMON_CONFIG + "keep_kernel_rules = true\n")
    daemon.start()
    chain = chain_for(topo, cache, tmp_path, daemon)
    ports = {"ctr-a": 9090, "ctr-b": 9091, "ctr-c": 9092, "ctr-d": 9093}
    spaces = {cid: container(topo) for cid in ports}
    pm = {cid: [{"hostPort": port, "containerPort": 8080, "protocol": "tcp"}] for cid, port in ports.items()}
    for cid, ns in spaces.items():
        chain.add(cid, ns.name, pm[cid])
    assert cni_table(topo, "portproxy_cni_departures") and departures(topo) == []
    servers = [Servers(ns, cid, [8080], []) for cid, ns in spaces.items()]
    try:
        daemon.stop()  # stopped: its socket is gone, DELs go daemonless; its rules stay
        daemon.procs.clear()
        assert ask_tcp(topo.client, topo.host_ip, 9090) == f"ctr-a {topo.client_ip}"
        chain.delete("ctr-a", spaces["ctr-a"].name, pm["ctr-a"])
        assert ask_tcp(topo.client, topo.host_ip, 9090) == "ConnectionRefusedError"  # now, not at the start
        assert ask_tcp(topo.client, topo.host_ip, 9092) == f"ctr-c {topo.client_ip}"  # others' kept rules stay
        # the port of a kept mapping is taken: another container asking for it is refused
        other = container(topo)
        with pytest.raises(AssertionError, match=r'"code": 101.*9092.*portproxy daemon'):
            chain.add("ctr-x", other.name, pm["ctr-c"])
        chain.delete("ctr-x", other.name, pm["ctr-c"])  # a word the daemon will find nothing for
        # a DEL whose ports cannot be worked out (mapped twice) still succeeds: the word is left
        twice = [pm["ctr-c"][0], {**pm["ctr-c"][0], "containerPort": 8081}]
        got = chain.mapper_call("DEL", "ctr-x", other.name, twice, chain.results["ctr-c"])
        assert (got.rc, got.stdout) == (0, "") and "mapped twice" in got.stderr, got
        assert ask_tcp(topo.client, topo.host_ip, 9092) == f"ctr-c {topo.client_ip}"
        # a GC cannot collect what only the absent daemon knows: try again later
        gc = chain.conf(chain.mapper_entry())
        gc["cniVersion"] = "1.1.0"
        gc["cni.dev/valid-attachments"] = []
        got = chain.invoke("portproxy-cni", chain.env("GC"), json.dumps(gc))
        assert (got.rc, got.json["code"]) == (1, 11), got
        # a network reload while it is away (DEL, then ADD into the plugin's table): the saved
        # mappings go, the new ones (to the address the container has now) are adopted
        chain.delete("ctr-b", spaces["ctr-b"].name, pm["ctr-b"])
        chain.add("ctr-b", spaces["ctr-b"].name, pm["ctr-b"])
        assert departures(topo) == ["ctr-a eth0 pptest", "ctr-b eth0 pptest", "ctr-x eth0 pptest", "ctr-x eth0 pptest"]
        daemon.start()
        assert sorted(m["owner"]["id"] for m in daemon.ls()) == ["ctr-b", "ctr-b", "ctr-c", "ctr-c", "ctr-d", "ctr-d"]
        assert departures(topo) == []
        assert ask_tcp(topo.client, topo.host_ip, 9090) == "ConnectionRefusedError"
        assert ask_tcp(topo.client, topo.host_ip, 9091) == f"ctr-b {topo.client_ip}"
        # crashed: the socket stays and does not answer; DEL is recorded (and succeeds), ADD is refused
        daemon.procs[-1].proc.kill()
        daemon.procs[-1].proc.wait()
        daemon.procs.clear()
        assert ask_tcp(topo.client, topo.host_ip, 9092) == f"ctr-c {topo.client_ip}"  # a crash keeps the rules
        got = chain.mapper_call("DEL", "ctr-c", spaces["ctr-c"].name, pm["ctr-c"], chain.results["ctr-c"])
        assert (got.rc, got.stdout) == (0, "") and "does not answer" in got.stderr, got
        assert ask_tcp(topo.client, topo.host_ip, 9092) == "ConnectionRefusedError"
        assert ask_tcp(topo.client, topo.host_ip, 9093) == f"ctr-d {topo.client_ip}"
        got = chain.mapper_call("ADD", "ctr-e", spaces["ctr-c"].name, [{**pm["ctr-c"][0], "hostPort": 9094}],
                                chain.results["ctr-c"])
        assert (got.rc, got.json["code"]) == (1, 11), got
        assert departures(topo) == ["ctr-c eth0 pptest"]
        daemon.start()
        assert sorted({m["owner"]["id"] for m in daemon.ls()}) == ["ctr-b", "ctr-d"]
        assert ask_tcp(topo.client, topo.host_ip, 9092) == "ConnectionRefusedError"
        assert ask_tcp(topo.client, topo.host_ip, 9093) == f"ctr-d {topo.client_ip}"
        for cid in ("ctr-b", "ctr-d"):
            chain.delete(cid, spaces[cid].name, pm[cid])
        daemon.stop()  # holding no CNI mapping, it expects no word: the table goes
        daemon.procs.clear()
        assert not cni_table(topo, "portproxy_cni_departures")
        chain.delete("ctr-d", spaces["ctr-d"].name, pm["ctr-d"])  # daemonless, nobody to tell: nothing recorded
        assert not cni_table(topo, "portproxy_cni_departures")
    finally:
        for s in servers:
            s.close()


def test_a_dead_socket_of_a_daemon_without_cni_mappings(topo: DemoTopology, cache: Path, tmp_path: Path) -> None:
    """A crashed daemon that held no CNI mapping (no departures table) has nothing of a
    container: DEL completes; GC collects the plugin's own table and still says try again."""
    dead = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(dead))
    chain = make_chain(topo, cache, tmp_path, "portproxy-cni", mapper_conf={"daemonSocket": ""})
    a, b = container(topo), container(topo)
    chain.add("ctr-a", a.name, WEB[:1])
    chain.add("ctr-b", b.name, [{**WEB[0], "hostPort": 9091}])
    on_dead = {**chain.mapper_entry(), "daemonSocket": str(dead)}
    got = chain.invoke("portproxy-cni", chain.env("DEL", "ctr-a", a.name),
                       json.dumps(chain.conf(on_dead, chain.results["ctr-a"], WEB[:1])))
    assert (got.rc, got.stdout) == (0, "") and "held no CNI mapping" in got.stderr, got
    assert ask_tcp(topo.client, topo.host_ip, 9090) == "ConnectionRefusedError"
    gc = chain.conf(on_dead)
    gc["cniVersion"] = "1.1.0"
    gc["cni.dev/valid-attachments"] = []
    got = chain.invoke("portproxy-cni", chain.env("GC"), json.dumps(gc))
    assert (got.rc, got.json["code"]) == (1, 11), got
    assert not cni_table(topo)  # ctr-b's mapping was collected all the same


def test_refusals(topo: DemoTopology, cache: Path, tmp_path: Path, daemon: Daemon) -> None:
    daemon.start()
    chain = chain_for(topo, cache, tmp_path, daemon)
    a, b = container(topo), container(topo)
    chain.add("ctr-a", a.name, WEB)
    with pytest.raises(AssertionError, match=r'"code": 101.*portproxy daemon: .*overlap'):
        chain.add("ctr-b", b.name, WEB[:1])
    chain.delete("ctr-b", b.name, WEB[:1])
    assert {m["owner"]["id"] for m in daemon.ls()} == {"ctr-a"}
    # a table-wide option the daemon's table does not have: refused, not served differently
    got = chain.mapper_call("ADD", "ctr-b", b.name, [{**WEB[0], "hostPort": 9191}], chain.results["ctr-a"],
                            extra={"masqAll": True})
    assert (got.rc, got.json["code"]) == (1, 2) and "masqAll" in got.json["msg"], got
    # a socket that exists but does not answer (a crashed daemon): an error, not a silent second table
    dead = tmp_path / "dead.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(dead))
    sock.close()
    got = chain.mapper_call("ADD", "ctr-b", b.name, [{**WEB[0], "hostPort": 9191}], chain.results["ctr-a"],
                            extra={"daemonSocket": str(dead)})
    assert (got.rc, got.json["code"]) == (1, 11) and "does not answer" in got.json["msg"], got
    assert not cni_table(topo)
    status = chain.invoke("portproxy-cni", chain.env("STATUS"),
                          json.dumps(chain.conf({**chain.mapper_entry(), "daemonSocket": str(dead)})))
    assert (status.rc, status.json["code"]) == (1, 50), status
    status = chain.invoke("portproxy-cni", chain.env("STATUS"), json.dumps(chain.conf(chain.mapper_entry())))
    assert (status.rc, status.stdout) == (0, ""), status
    # a server that accepts and answers HTTP 200 "{}" is not a portproxy daemon: STATUS says so,
    # and an ADD is refused rather than reported done with no DNAT anywhere
    other = tmp_path / "other.sock"
    server = topo.host.popen([sys.executable, "-c", NOT_PORTPROXY, str(other)], stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None and server.stdout.readline() == b"listening\n"
        conf = {**chain.mapper_entry(), "daemonSocket": str(other)}
        status = chain.invoke("portproxy-cni", chain.env("STATUS"), json.dumps(chain.conf(conf)))
        assert (status.rc, status.json["code"]) == (1, 50) and "portproxy" in status.json["details"], status
        got = chain.mapper_call("ADD", "ctr-b", b.name, [{**WEB[0], "hostPort": 9191}], chain.results["ctr-a"],
                                extra={"daemonSocket": str(other)})
        assert (got.rc, got.json["code"]) == (1, 5) and "not a portproxy daemon" in got.json["msg"], got
    finally:
        server.kill()
        server.wait()


NOT_PORTPROXY = """import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1])
s.listen(8)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.recv(65536)
    c.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\n{}")
    c.close()
"""


def test_a_daemon_of_another_namespace_is_not_used(topo: DemoTopology, tmp_path: Path, daemon: Daemon) -> None:
    """A socket path is visible from every network namespace; the daemon behind it serves only its own."""
    from portproxy.cni.with_daemon import connect
    from portproxy.cni.protocol import parse_config

    daemon.start()
    conf = parse_config({"cniVersion": "1.0.0", "name": "pptest"})
    here = topo.host.run(lambda: connect(str(daemon.socket), conf))
    assert here is not None
    here.sock.close()
    assert connect(str(daemon.socket), conf) is None  # this test process runs in another namespace


def roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    return sock.recv(4096)


def test_daemon_adopts_what_the_plugin_installed(topo: DemoTopology, cache: Path, tmp_path: Path,
                                                  daemon: Daemon) -> None:
    chain = chain_for(topo, cache, tmp_path, daemon)  # the socket is not there yet: daemonless
    web, other = container(topo), container(topo)
    ranges = [{"hostPort": 10000 + i, "containerPort": 7000 + i, "protocol": "tcp"} for i in range(3)]
    ip4, ip6 = addresses(chain.add("ctr-web", web.name, [WEB[0], *ranges]))
    chain.add("ctr-other", other.name, [{"hostPort": 9091, "containerPort": 8080, "protocol": "tcp"}])
    assert cni_table(topo)
    servers = [Servers(web, "web", [7000, 7001, 7002], [], echo=(8080,)), Servers(other, "other", [8080], [])]
    live = topo.client.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        live.settimeout(5)
        live.connect((topo.host_ip, 9090))
        assert roundtrip(live, b"before") == b"before"
        daemon.start()
        listed = daemon.ls()
        assert sorted((m["spec"], m["owner"]["id"], m["status"]) for m in listed) == sorted([
            (f"0.0.0.0:9090:{ip4}:8080/tcp", "ctr-web", "running"),
            (f"[::]:9090:[{ip6}]:8080/tcp", "ctr-web", "running"),
            (f"0.0.0.0:10000-10002:{ip4}:7000-7002/tcp", "ctr-web", "running"),
            (f"[::]:10000-10002:[{ip6}]:7000-7002/tcp", "ctr-web", "running"),
            (f"0.0.0.0:9091:{addresses(chain.results['ctr-other'])[0]}:8080/tcp", "ctr-other", "running"),
            (f"[::]:9091:[{addresses(chain.results['ctr-other'])[1]}]:8080/tcp", "ctr-other", "running")])
        assert all(m["source"] == "cni" and m["owner"]["network"] == "pptest" for m in listed)
        assert {m["owner"].get("name") for m in listed} == {"web"}  # the pod's name, kept in the table
        assert not cni_table(topo)
        assert roundtrip(live, b"after") == b"after"  # the connection made through the plugin's DNAT lives on
        assert ask_tcp(topo.client, topo.host_ip, 10001) == f"web {topo.client_ip}"
        assert ask_tcp(topo.client, topo.host_ip6, 9091) == f"other {topo.client_ip6}"
        assert f"{ip4}:7000-7002" in daemon.metrics()
        got = chain.check("ctr-web", web.name, [WEB[0], *ranges])
        assert (got.rc, got.stdout) == (0, ""), got
        chain.delete("ctr-web", web.name, [WEB[0], *ranges])
        assert {m["owner"]["id"] for m in daemon.ls()} == {"ctr-other"}
        assert ask_tcp(topo.client, topo.host_ip, 10001) == "ConnectionRefusedError"
    finally:
        live.close()
        for s in servers:
            s.close()


def test_stale_udp_flow_flushed_on_add(topo: DemoTopology, cache: Path, tmp_path: Path, daemon: Daemon) -> None:
    """A client that sent to the port before it was published gets through from the same source port."""
    daemon.start()
    check_stale_udp_flow_flushed(topo, chain_for(topo, cache, tmp_path, daemon))
