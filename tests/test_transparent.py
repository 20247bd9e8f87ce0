"""Transparent mode (``--source client``): the target sees the client's own address and port.

Pure parts (fallback decisions, builders, option checks) run without root; the rest
runs a real ``portproxy map --source client`` in the host namespace of a fresh
topology, with the real kernel's policy routing and the real nft.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import subprocess
import sys

import pytest

from conftest import open_connection, start_server, start_udp_echo, udp_endpoint
from portproxy.kernel.transparent_rules import (TransparentOptions, delete_commands, install_commands, mark_value,
                                                route_is_ours, rule_is_ours)
from portproxy.proxy.source import fallback_reason
from tests.support.namespaces import add_container

# --- pure -----------------------------------------------------------------------------------------


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


# --- real namespaces -------------------------------------------------------------------------------

async def peer_reporter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Say the peer's "ip port" as the container sees it, then close."""
    ip, port = writer.get_extra_info("peername")[:2]
    writer.write(f"{ip} {port}".encode())
    await writer.drain()
    writer.close()


async def seen_by_target(ns, host: str, port: int) -> tuple[str, int, tuple]:
    """Connect from ``ns``; return what the target saw and our own local address."""
    reader, writer = await open_connection(ns, host, port)
    local = writer.get_extra_info("sockname")
    try:
        ip, seen_port = (await asyncio.wait_for(reader.read(-1), 10)).decode().split()
    finally:
        writer.close()
    return ip, int(seen_port), local


def host_state(topo, table: int = 7719) -> dict:
    """The host namespace's rules and routes that point at ``table``, and its nft tables."""

    def read() -> dict:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            rules = [r.get_attr("FRA_PRIORITY") for fam in (socket.AF_INET, socket.AF_INET6)
                     for r in ipr.get_rules(family=fam) if r.get_attr("FRA_TABLE") == table]
            routes = [r["family"] for fam in (socket.AF_INET, socket.AF_INET6)
                      for r in ipr.get_routes(family=fam, table=table) if r.get_attr("RTA_TABLE") == table]
        return {"rules": rules, "routes": routes}

    state = topo.host.run(read)
    out = topo.host.popen(["nft", "-j", "list", "tables"], stdout=subprocess.PIPE, text=True).communicate(timeout=10)[0]
    state["nft"] = sorted(item["table"]["name"] for item in json.loads(out)["nftables"] if "table" in item)
    return state


EMPTY = {"rules": [], "routes": [], "nft": []}


async def test_tcp_target_sees_client_ipv4_and_ipv6(topo, portproxy) -> None:
    v4 = await start_server(topo.container, 8080, peer_reporter)
    v6 = await start_server(topo.container, 8080, peer_reporter, host="::")
    assert host_state(topo) == EMPTY
    proxy = portproxy("map", f"9090:{topo.container_ip}:8080", f"[::]:9096:[{topo.container_ip6}]:8080",
                      "--source", "client", ready=2)
    try:
        state = host_state(topo)
        assert state == {"rules": [7719, 7719], "routes": [socket.AF_INET, socket.AF_INET6],
                         "nft": ["portproxy_transparent"]}
        for _ in range(3):
            ip, port, local = await seen_by_target(topo.client, topo.host_ip, 9090)
            assert (ip, port) == (topo.client_ip, local[1])
        ip, port, local = await seen_by_target(topo.client, topo.host_ip6, 9096)
        assert (ip, port) == (topo.client_ip6, local[1])
    finally:
        assert proxy.stop() == 0
        v4.close()
        v6.close()
    assert host_state(topo) == EMPTY, proxy.stderr


async def test_udp_target_sees_client_ipv4_and_ipv6(topo, portproxy) -> None:
    servers = [await start_udp_echo(topo.container, 5353), await start_udp_echo(topo.container, 5353, "::")]
    portproxy("map", f"5353:{topo.container_ip}:5353/udp", f"[::]:5354:[{topo.container_ip6}]:5353/udp",
              "--source", "client", ready=2)
    try:
        for family_ip, host, port in ((topo.client_ip, topo.host_ip, 5353), (topo.client_ip6, topo.host_ip6, 5354)):
            client = await udp_endpoint(topo.client, "::" if ":" in host else "0.0.0.0")
            client.transport.sendto(b"whoami", (host, port))
            data, _ = await client.recv()
            local_port = client.transport.get_extra_info("sockname")[1]
            assert data.decode() == f"{family_ip} {local_port}"
            client.transport.sendto(b"echo", (host, port))
            assert (await client.recv())[0] == b"echo"
            client.transport.close()
    finally:
        for server in servers:
            server.close()


async def test_loopback_client_falls_back_to_host_address(topo, portproxy) -> None:
    server = await start_server(topo.container, 8080, peer_reporter)
    proxy = portproxy("map", f"9090:{topo.container_ip}:8080", "--source", "client", "--metrics-addr",
                      "127.0.0.1:9779")
    try:
        for _ in range(2):
            ip, _port, _local = await seen_by_target(topo.host, "127.0.0.1", 9090)
            assert ip == topo.bridge_ip
        ip, port, local = await seen_by_target(topo.client, topo.host_ip, 9090)
        assert (ip, port) == (topo.client_ip, local[1])

        def scrape() -> str:
            import urllib.request

            return urllib.request.urlopen("http://127.0.0.1:9779/metrics", timeout=10).read().decode()

        metrics = topo.host.run(scrape)
        assert 'portproxy_source_fallbacks_total{listen="*:9090",proto="tcp",reason="loopback",' \
               f'target="{topo.container_ip}:8080"}} 2.0' in metrics
    finally:
        proxy.stop()
        server.close()
    assert proxy.stderr.count("cannot be the source toward the target (loopback)") == 1, proxy.stderr


async def test_container_on_the_same_bridge_falls_back(topo, portproxy) -> None:
    """Another container reaching the published port: spoofing its address toward the
    target would make the target answer it directly, so it comes from the host instead."""
    other = add_container(topo, "pt-c2", "172.16.1.2", "fd00:172:16::2", "vc1")
    server = await start_server(topo.container, 8080, peer_reporter)
    proxy = portproxy("map", f"9090:{topo.container_ip}:8080", "--source", "client")
    try:
        ip, _port, _local = await seen_by_target(other, topo.host_ip, 9090)
        assert ip == topo.bridge_ip
        ip, port, local = await seen_by_target(topo.client, topo.host_ip, 9090)
        assert (ip, port) == (topo.client_ip, local[1])
    finally:
        proxy.stop()
        server.close()
    assert "(same_link)" in proxy.stderr, proxy.stderr


async def test_without_net_admin_one_line_and_nothing_left(topo, portproxy) -> None:
    capsh = ["capsh", "--drop=cap_net_admin", "--", "-c", 'exec "$0" "$@"']
    proxy = portproxy("map", f"9090:{topo.container_ip}:8080", "--source", "client", ready=None, prefix=capsh)
    assert proxy.proc.wait(timeout=60) == 1
    proxy.stop()
    lines = proxy.stderr.strip().splitlines()
    assert len(lines) == 1 and "CAP_NET_ADMIN" in lines[0], proxy.stderr
    assert host_state(topo) == EMPTY


async def test_conflicting_table_is_refused_and_left_alone(topo, portproxy) -> None:
    def add_foreign_rule() -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            ipr.rule("add", table=7719, priority=500, src="10.9.0.0", src_len=16, family=socket.AF_INET)

    topo.host.run(add_foreign_rule)
    proxy = portproxy("map", f"9090:{topo.container_ip}:8080", "--source", "client", ready=None)
    assert proxy.proc.wait(timeout=60) == 1
    proxy.stop()
    assert "routing table 7719 is already used" in proxy.stderr and len(proxy.stderr.strip().splitlines()) == 1
    assert host_state(topo) == {"rules": [500], "routes": [], "nft": []}


def test_bad_mark_exit_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "portproxy", "map", "9090:172.16.1.1:8080", "--source", "client",
                           "--transparent-mark", "0x1/0xff00"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "argument --transparent-mark: '0x1/0xff00' transparent mark 0x1 must be non-zero and inside its mask" \
        in proc.stderr
    assert "Traceback" not in proc.stderr


def test_reconcile_recreates_deleted_pieces(topo) -> None:
    """What the daemon's reconcile relies on: present() sees a deleted piece, install() puts
    back exactly what is missing, remove() leaves nothing."""
    from portproxy.kernel.executor import Nft
    from portproxy.kernel.transparent import TransparentRouting
    from portproxy.kernel.transparent_rules import rule_args

    def scenario() -> list[bool]:
        from pyroute2 import IPRoute

        routing = TransparentRouting(TransparentOptions())
        seen = []
        routing.install()
        try:
            seen.append(routing.present())
            with IPRoute() as ipr:
                ipr.rule("del", **rule_args(routing.opts, socket.AF_INET))
            seen.append(routing.present())
            routing.install()
            seen.append(routing.present())
            Nft().apply(delete_commands(routing.opts))
            seen.append(routing.present())
            routing.install()
            seen.append(routing.present())
        finally:
            routing.remove()
        return seen

    assert topo.host.run(scenario) == [True, False, True, False, True]
    assert host_state(topo) == EMPTY
