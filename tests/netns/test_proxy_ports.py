"""Exclusive ports and the serve / hold / remove life cycle of ProxyServer, in-process.

The server runs on a uvloop loop in a thread that entered the test's host namespace,
so every socket it binds lives there. Echo servers and clients are made inside the
container and client namespaces. "Another process" is a real one: a Python child in
the host namespace that tries to bind the port every way a program can ask
(SO_REUSEADDR and SO_REUSEPORT on or off, wildcard, the host's address, loopback,
the IPv6 wildcard) and reports what the kernel said.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys

import pytest

from tests.support.traffic import echo_handler, open_connection, start_server, start_udp_echo, udp_endpoint
from portproxy.lab.namespaces import Namespace
from portproxy.lab.topology import DemoTopology
from portproxy.proxy import ProxyServer
from portproxy.proxy.server import ProxyError
from portproxy.spec import parse_spec
from tests.support.inprocess import run_in_host

BIND_PROBE = r"""
import errno, json, socket, sys
results = []
for proto, host, port, reuseaddr, reuseport in json.loads(sys.argv[1]):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, reuseaddr)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, reuseport)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        s.bind((host, port))
        if proto == "tcp":
            s.listen()
        outcome = "bound"
    except OSError as exc:
        outcome = errno.errorcode.get(exc.errno, str(exc.errno))
    s.close()
    results.append([proto, host, port, reuseaddr, reuseport, outcome])
print(json.dumps(results))
"""

HOLDER = r"""
import socket, sys
proto, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("0.0.0.0", port))
if proto == "tcp":
    s.listen()
print("holding", flush=True)
sys.stdin.read()
"""


def foreign_binds(ns: Namespace, proto: str, port: int, hosts: list[str]) -> list[list]:
    """Every way another process might bind ``port``, tried by one; what each got."""
    tries = [[proto, host, port, reuseaddr, reuseport]
             for host in hosts for reuseaddr in (0, 1) for reuseport in (0, 1)]
    proc = ns.popen([sys.executable, "-c", BIND_PROBE, json.dumps(tries)], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    return json.loads(out)


def assert_all_refused(results: list[list]) -> None:
    bound = [r for r in results if r[-1] != "EADDRINUSE"]
    assert not bound, f"another process could bind a port portproxy holds: {bound}"


def hosts_for(topo: DemoTopology) -> list[str]:
    return ["0.0.0.0", topo.host_ip, "127.0.0.1", "::"]


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), 10)


def test_a_port_shared_by_another_process_is_refused(topo: DemoTopology) -> None:
    """Another process holds the second port of a range with SO_REUSEPORT: add() fails in
    one line and leaves the first port free again (all or nothing)."""
    for proto in ("tcp", "udp"):
        holder = topo.host.popen([sys.executable, "-c", HOLDER, proto, "9301"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
            mapping = parse_spec(f"0.0.0.0:9300-9301:{topo.container_ip}:8080-8081/{proto}")

            async def body(server: ProxyServer) -> None:
                with pytest.raises(ProxyError) as caught:
                    server.add(mapping)
                assert str(caught.value) == f"cannot listen on 0.0.0.0:9301/{proto}: port is already in use"
                assert mapping not in server
                # Nothing of the mapping stays bound: port 9300 is free for anyone.
                assert all(r[-1] == "bound" for r in foreign_binds(topo.host, proto, 9300, ["0.0.0.0"]))

            run_in_host(topo, body)
        finally:
            holder.communicate(timeout=10)


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_no_one_else_can_bind_a_serving_or_held_port(topo: DemoTopology, proto: str) -> None:
    mapping = parse_spec(f"0.0.0.0:9310:{topo.container_ip}:8080/{proto}")
    loopback = parse_spec(f"127.0.0.1:9311:{topo.container_ip}:8080/{proto}")

    async def body(server: ProxyServer) -> None:
        server.add(mapping)
        server.add(loopback, serve=False)
        assert server.serving(mapping) and not server.serving(loopback)
        assert server.held == {loopback}
        assert_all_refused(foreign_binds(topo.host, proto, 9310, hosts_for(topo)))
        assert_all_refused(foreign_binds(topo.host, proto, 9311, ["0.0.0.0", "127.0.0.1", "::"]))
        server.hold(mapping)
        server.hold(mapping)  # idempotent
        assert server.held == {mapping, loopback}
        assert_all_refused(foreign_binds(topo.host, proto, 9310, hosts_for(topo)))
        server.serve(mapping)
        server.serve(mapping)
        assert_all_refused(foreign_binds(topo.host, proto, 9310, hosts_for(topo)))
        server.remove(mapping)
        server.remove(loopback)
        assert mapping not in server and loopback not in server
        for port in (9310, 9311):
            assert all(r[-1] == "bound" for r in foreign_binds(topo.host, proto, port, ["0.0.0.0"]) if r[3] == 1)

    run_in_host(topo, body)


def test_hold_and_serve_keep_live_and_queued_connections(topo: DemoTopology) -> None:
    """hold → serve → hold: a live connection relays throughout, connections waiting in the
    accept queue when hold() comes are relayed, new ones are refused while held."""
    mapping = parse_spec(f"0.0.0.0:9320:{topo.container_ip}:8080")

    async def body(server: ProxyServer) -> None:
        echo_server = await start_server(topo.container, 8080, echo_handler)
        try:
            server.add(mapping)
            live = await open_connection(topo.client, topo.host_ip, 9320)
            assert await echo(*live, b"first") == b"first"
            for cycle in range(3):
                # Blocking connects while this loop (the proxy's) is busy here: the
                # handshakes complete in the kernel and the connections wait in the queue.
                queued = [topo.client.socket() for _ in range(5)]
                for sock in queued:
                    sock.settimeout(5)
                    sock.connect((topo.host_ip, 9320))
                    sock.setblocking(False)
                server.hold(mapping)
                assert not server.serving(mapping)
                for sock in queued:
                    reader, writer = await asyncio.open_connection(sock=sock)
                    assert await echo(reader, writer, b"queued %d" % cycle) == b"queued %d" % cycle
                    writer.close()
                assert await echo(*live, b"held %d" % cycle) == b"held %d" % cycle
                with pytest.raises(ConnectionRefusedError):
                    await open_connection(topo.client, topo.host_ip, 9320)
                server.serve(mapping)
                assert server.serving(mapping)
                fresh = await open_connection(topo.client, topo.host_ip, 9320)
                assert await echo(*fresh, b"served %d" % cycle) == b"served %d" % cycle
                fresh[1].close()
                assert await echo(*live, b"live %d" % cycle) == b"live %d" % cycle
            # remove(): the port is free for another program at once, and the live
            # connection runs on to its end.
            server.remove(mapping)
            assert all(r[-1] == "bound" for r in foreign_binds(topo.host, "tcp", 9320, ["0.0.0.0"]) if r[3] == 1)
            assert await echo(*live, b"removed") == b"removed"
            assert server.connection_count() == 1
            live[1].close()
        finally:
            echo_server.close()

    run_in_host(topo, body)


def test_udp_hold_and_serve(topo: DemoTopology) -> None:
    mapping = parse_spec(f"0.0.0.0:9330:{topo.container_ip}:5353/udp")

    async def body(server: ProxyServer) -> None:
        echo_server = await start_udp_echo(topo.container, 5353)
        try:
            server.add(mapping, serve=False)
            assert server.held == {mapping}
            server.serve(mapping)
            client = await udp_endpoint(topo.client)
            assert client.transport is not None
            for round_ in range(3):
                client.transport.sendto(b"ping %d" % round_, (topo.host_ip, 9330))
                assert (await client.recv())[0] == b"ping %d" % round_
                server.hold(mapping)
                assert server.held == {mapping}
                server.serve(mapping)
        finally:
            echo_server.close()

    run_in_host(topo, body)


def test_adopted_socket_is_held_served_and_given_back(topo: DemoTopology) -> None:
    """A supervisor's socket (socket activation) is served, held, served again, and after
    remove() is still open and listening: it belongs to the supervisor."""
    mapping = parse_spec(f"0.0.0.0:9340:{topo.container_ip}:8080")
    passed = topo.host.socket(socket.AF_INET, socket.SOCK_STREAM)
    passed.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    passed.bind(("0.0.0.0", 9340))
    passed.listen()

    async def body(server: ProxyServer) -> None:
        echo_server = await start_server(topo.container, 8080, echo_handler)
        try:
            server.adopt(passed)
            server.add(mapping)
            server.hold(mapping)
            assert_all_refused(foreign_binds(topo.host, "tcp", 9340, hosts_for(topo)))
            server.serve(mapping)
            conn = await open_connection(topo.client, topo.host_ip, 9340)
            assert await echo(*conn, b"adopted") == b"adopted"
            conn[1].close()
            server.hold(mapping)
            server.remove(mapping)
            assert passed.fileno() != -1
            assert passed.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        finally:
            echo_server.close()

    try:
        run_in_host(topo, body)
    finally:
        passed.close()


def test_serve_and_hold_need_a_mapping(topo: DemoTopology) -> None:
    mapping = parse_spec(f"0.0.0.0:9350:{topo.container_ip}:8080")

    async def body(server: ProxyServer) -> None:
        for call in (server.serve, server.hold):
            with pytest.raises(ProxyError, match="is not running"):
                call(mapping)
        server.remove(mapping)  # nothing to remove: nothing happens
        assert not server.serving(mapping)

    run_in_host(topo, body)

