"""TCP through the userland proxy: a real portproxy process in the host namespace, real traffic.

Every relay test runs on the splice path, the copy path (--no-splice) and the
stock asyncio loop, so all three stay correct.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import struct
import socket
import subprocess
import time

import pytest

from tests.support.metrics import http_get, sample
from tests.support.traffic import (check_congestion_control_per_leg, congestion_control_choice,
                                   connect_expecting_close, echo_roundtrip, open_connection, start_server)

PATHS = {
    "splice-uvloop": [],
    "copy-uvloop": ["--no-splice"],
    "splice-asyncio": ["--loop", "asyncio"],
}


@pytest.fixture(params=list(PATHS))
def path_args(request: pytest.FixtureRequest) -> list[str]:
    return PATHS[request.param]


async def _echo_roundtrip(topo, port: int, payload: bytes, host: str | None = None) -> bytes:
    return await echo_roundtrip(topo.client, host or topo.host_ip, port, payload)


async def test_8mib_echo_byte_for_byte(topo, tcp_echo, portproxy, path_args) -> None:
    proxy = portproxy("map", f"9090:{topo.container_ip}:8080", *path_args)
    assert proxy.ready == [f"ready tcp 0.0.0.0:9090 -> {topo.container_ip}:8080"]
    payload = os.urandom(8 << 20)
    received = await _echo_roundtrip(topo, 9090, payload)
    assert len(received) == len(payload)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


async def test_half_close_reply_after_eof(topo, portproxy, path_args) -> None:
    """The client shuts down writing; the server answers after EOF; the client gets the answer."""

    async def answer_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(-1)
        await asyncio.sleep(0.2)  # the proxy must keep the other direction open meanwhile
        writer.write(b"got %d bytes, sha256 %s" % (len(data), hashlib.sha256(data).hexdigest().encode()))
        await writer.drain()
        writer.close()

    server = await start_server(topo.container, 8081, answer_after_eof)
    portproxy("map", f"9091:{topo.container_ip}:8081", *path_args)
    payload = os.urandom(300_000)
    reader, writer = await open_connection(topo.client, topo.host_ip, 9091)
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    reply = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    server.close()
    assert reply == b"got %d bytes, sha256 %s" % (len(payload), hashlib.sha256(payload).hexdigest().encode())


async def test_200_concurrent_connections(topo, tcp_echo, portproxy, path_args) -> None:
    portproxy("map", f"9090:{topo.container_ip}:8080", *path_args)
    payloads = [os.urandom(20_000 + i * 97) for i in range(200)]
    results = await asyncio.gather(*(_echo_roundtrip(topo, 9090, p) for p in payloads))
    assert results == payloads


async def test_dead_target_closes_client_and_keeps_serving(topo, tcp_echo, portproxy) -> None:
    proxy = portproxy(
        "map", f"9090:{topo.container_ip}:8080", f"9092:{topo.container_ip}:8099", "9093:172.16.1.99:8080",
        "--connect-timeout", "1", ready=3,
    )
    # Refused at the target: the client is reset at once.
    t0 = time.monotonic()
    await connect_expecting_close(topo.client, topo.host_ip, 9092, 5)
    assert time.monotonic() - t0 < 1.0
    # No answer at all: the client is closed after the connect timeout.
    t0 = time.monotonic()
    await connect_expecting_close(topo.client, topo.host_ip, 9093, 10)
    assert 0.9 < time.monotonic() - t0 < 3.0
    # The healthy mapping is unaffected.
    assert await _echo_roundtrip(topo, 9090, b"still here") == b"still here"
    assert proxy.proc.poll() is None
    proxy.stop()
    assert "connect to 172.16.1.1:8099 failed: Connection refused" in proxy.stderr
    assert "connect to 172.16.1.99:8080 failed: no answer within 1s" in proxy.stderr


async def test_port_range_maps_port_to_port(topo, portproxy) -> None:
    servers = []
    for port in range(8100, 8104):
        async def tag(reader, writer, port=port):
            writer.write(str(port).encode())
            await writer.drain()
            writer.close()
        servers.append(await start_server(topo.container, port, tag))
    proxy = portproxy("map", f"9100-9103:{topo.container_ip}:8100-8103", ready=4)
    assert proxy.ready[-1] == f"ready tcp 0.0.0.0:9103 -> {topo.container_ip}:8103"
    for offset in range(4):
        reader, writer = await open_connection(topo.client, topo.host_ip, 9100 + offset)
        assert await asyncio.wait_for(reader.read(-1), 5) == str(8100 + offset).encode()
        writer.close()
    for server in servers:
        server.close()


async def test_ipv6_target_published_on_both_families(topo, tcp_echo, portproxy, path_args) -> None:
    proxy = portproxy("map", f"9096:[{topo.container_ip6}]:8080", *path_args, ready=2)
    assert proxy.ready == [f"ready tcp 0.0.0.0:9096 -> [{topo.container_ip6}]:8080",
                           f"ready tcp [::]:9096 -> [{topo.container_ip6}]:8080"]
    payload = os.urandom(1 << 20)
    assert await _echo_roundtrip(topo, 9096, payload, host=topo.host_ip6) == payload
    # An IPv4 client reaches the IPv6 target through the IPv4 listener.
    assert await _echo_roundtrip(topo, 9096, payload, host=topo.host_ip) == payload


async def test_explicit_wildcards_are_one_family_each(topo, tcp_echo, portproxy) -> None:
    """``[::]:`` is IPv6 only and ``0.0.0.0:`` IPv4 only, as docker-proxy listens."""
    portproxy("map", f"[::]:9097:{topo.container_ip}:8080", f"0.0.0.0:9098:{topo.container_ip}:8080", ready=2)
    assert await _echo_roundtrip(topo, 9097, b"six", host=topo.host_ip6) == b"six"
    assert await _echo_roundtrip(topo, 9098, b"four", host=topo.host_ip) == b"four"
    for port, host in ((9097, topo.host_ip), (9098, topo.host_ip6)):
        with pytest.raises(ConnectionRefusedError):
            await open_connection(topo.client, host, port)


async def test_reset_propagates(topo, portproxy) -> None:
    """A target that resets its side makes the proxy reset the client."""

    async def reset_after_hello(reader, writer):
        await reader.readexactly(5)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()

    server = await start_server(topo.container, 8082, reset_after_hello)
    portproxy("map", f"9094:{topo.container_ip}:8082")
    reader, writer = await open_connection(topo.client, topo.host_ip, 9094)
    writer.write(b"hello")
    await writer.drain()
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(100), 5)
    server.close()


async def test_graceful_stop_lets_live_connections_finish(topo, tcp_echo, portproxy) -> None:
    proxy = portproxy("map", f"9090:{topo.container_ip}:8080", "--drain-timeout", "5")
    reader, writer = await open_connection(topo.client, topo.host_ip, 9090)
    writer.write(b"before")
    assert await reader.readexactly(6) == b"before"
    proxy.proc.terminate()
    await asyncio.sleep(0.5)
    # New connections are refused, the live one still works.
    with pytest.raises(ConnectionRefusedError):
        await open_connection(topo.client, topo.host_ip, 9090)
    writer.write(b"during")
    assert await reader.readexactly(6) == b"during"
    writer.write_eof()
    assert await reader.read(-1) == b""
    writer.close()
    assert await asyncio.to_thread(proxy.proc.wait, 10) == 0


async def test_out_of_fds_backs_off_and_recovers(topo, tcp_echo, portproxy) -> None:
    """EMFILE on accept: no spinning, one log line, and service resumes once fds free up."""
    proxy = portproxy("map", f"9090:{topo.container_ip}:8080", prefix=["prlimit", "--nofile=48:48", "--"])
    held = [topo.client.socket() for _ in range(30)]  # two fds each in the proxy: it runs out
    for client in held:
        client.setblocking(False)  # plain connects: one may be reset (no fd for its target)
        client.connect_ex((topo.host_ip, 9090))
    await asyncio.sleep(1.0)
    cpu_before = _cpu_seconds(proxy.proc.pid)
    await asyncio.sleep(1.0)
    assert _cpu_seconds(proxy.proc.pid) - cpu_before < 0.2  # backing off, not spinning
    for client in held:
        client.close()
    await asyncio.sleep(1.5)
    # Recovered: new connections are served again.
    reader, writer = await open_connection(topo.client, topo.host_ip, 9090)
    writer.write(b"back")
    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"back"
    writer.close()
    proxy.stop()
    warnings = [line for line in proxy.stderr.splitlines() if "backing off" in line]
    assert len(warnings) == 1 and "Too many open files" in warnings[0]
    assert "accepting again" in proxy.stderr


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_target_cc_applies_to_the_target_leg_only(topo, tcp_echo, portproxy) -> None:
    default, chosen = congestion_control_choice(topo.host)
    portproxy("map", f"9090:{topo.container_ip}:8080", "--target-cc", chosen)
    await check_congestion_control_per_leg(topo, 9090, 8080, default, chosen)


async def test_out_of_fds_for_the_target_socket_resets_the_client(topo, tcp_echo, portproxy) -> None:
    """EMFILE on the socket to the target: the client is reset and counted, nothing is left
    in CLOSE-WAIT, the active count returns to 0 and a stop does not wait for a ghost.

    Accepting takes one fd and the target's socket a second: with an odd number of fds
    left, the last accept succeeds and the socket fails. The parity depends on how many fds
    the process has open at rest, so two processes differing by one fd cover both."""
    emfile = 0
    for offset in (0, 1):
        port, metrics_port = 9090 + offset, 9780 + offset
        proxy = portproxy("map", f"{port}:{topo.container_ip}:8080", "--drain-timeout", "30",
                          "--metrics-addr", f"127.0.0.1:{metrics_port}", prefix=["prlimit", f"--nofile={48 + offset}", "--"])
        # Plain non-blocking connects: the proxy may reset some of them while they connect.
        clients = [topo.client.socket() for _ in range(40)]
        for client in clients:
            client.setblocking(False)
            client.connect_ex((topo.host_ip, port))
        await _until(lambda: "backing off" in proxy.stderr, f"{port}: the proxy never ran out of fds")
        for client in clients:
            client.close()

        def settled() -> bool:
            text = scrape_on(topo.host, metrics_port)
            stuck = topo.host.run(subprocess.check_output, ["ss", "-Htn", "state", "close-wait", f"( sport = :{port} )"])
            return sample(text, "portproxy_connections_active") == 0 and not stuck.strip()

        await _until(settled, f"{port}: connections left in CLOSE-WAIT or counted as active")
        emfile += int(sample(scrape_on(topo.host, metrics_port), "portproxy_connect_failures_total", reason="EMFILE") or 0)
        t0 = time.monotonic()
        proxy.proc.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(proxy.proc.wait, 20) == 0
        assert time.monotonic() - t0 < 10  # not the 30 s drain timeout: nothing was left to drain
    assert emfile >= 1  # one of the two ran out exactly between accept and the target's socket


def scrape_on(ns, port: int) -> str:
    try:
        return http_get(ns, port, "/metrics")
    except OSError:
        return ""  # the proxy is still out of fds: its metrics server cannot accept either


async def _until(condition, message: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, message
        await asyncio.sleep(0.2)


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_client_reset_while_connecting_cancels_the_connect(topo, portproxy) -> None:
    """A client that resets while its connect to the target is still pending (a target
    that never answers) is let go at once: not counted as active, its fds and the
    pending connect freed, counted as ``client_gone`` — not held for the connect timeout."""
    # A target whose accept queue is full drops every SYN: connects to it stay pending.
    full = topo.container.socket()
    full.bind(("0.0.0.0", 8098))
    full.listen(0)
    filler = topo.container.socket()
    filler.connect((topo.container_ip, 8098))
    try:
        proxy = portproxy("map", f"9093:{topo.container_ip}:8098", "--connect-timeout", "60",
                          "--metrics-addr", "127.0.0.1:9783")
        baseline = _open_fds(proxy.proc.pid)
        loop = asyncio.get_running_loop()
        clients = []
        for _ in range(20):
            client = topo.client.socket()
            client.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(client, (topo.host_ip, 9093)), 10)
            clients.append(client)
        await _until(lambda: sample(scrape_on(topo.host, 9783), "portproxy_connections_active") == 20,
                     "the proxy never accepted the 20 clients")
        assert _open_fds(proxy.proc.pid) >= baseline + 40  # each: the client and the pending connect
        for client in clients:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a RST
            client.close()

        def released() -> bool:
            text = scrape_on(topo.host, 9783)
            return sample(text, "portproxy_connections_active") == 0 and _open_fds(proxy.proc.pid) <= baseline

        await _until(released, "connections of reset clients still held while their connect is pending", timeout=15)
        text = scrape_on(topo.host, 9783)
        assert sample(text, "portproxy_connect_failures_total", reason="client_gone") == 20
        assert proxy.proc.poll() is None
    finally:
        filler.close()
        full.close()


async def test_failed_connects_are_logged_once_then_summarised(topo, portproxy) -> None:
    """A target that refuses: the first failure is a WARNING at once, the rest are one
    summary line (written at the latest when the mapping stops), and the counter has them all."""
    proxy = portproxy("map", f"9092:{topo.container_ip}:8099", "--metrics-addr", "127.0.0.1:9784")
    for _ in range(50):
        await connect_expecting_close(topo.client, topo.host_ip, 9092, 5)
    await _until(lambda: sample(scrape_on(topo.host, 9784), "portproxy_connect_failures_total",
                                reason="ECONNREFUSED") == 50, "not every failed connect was counted")
    proxy.stop()
    lines = [line for line in proxy.stderr.splitlines() if "8099" in line]
    assert len(lines) == 2, lines
    assert "connect to 172.16.1.1:8099 failed: Connection refused" in lines[0]
    assert "connect to 172.16.1.1:8099 failed: 49 more in the last" in lines[1]
    assert "(ECONNREFUSED 49)" in lines[1]
