"""Transparent mode (``--source client``): the target sees the client's own address and port.

A real ``portproxy map --source client`` in the host namespace of a fresh topology, with
the real kernel's policy routing and the real nft. The pure parts (fallback decisions,
builders, option checks) are tests/unit/test_transparent_pure.py.
"""

from __future__ import annotations

import socket
import subprocess
import sys


from tests.support.traffic import start_server, start_udp_echo, udp_endpoint
from portproxy.kernel.transparent_rules import (TransparentOptions, delete_commands)
from tests.support.namespaces import add_container
from tests.support.transparent import host_state, peer_reporter, seen_by_target

# --- real namespaces -------------------------------------------------------------------------------


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
