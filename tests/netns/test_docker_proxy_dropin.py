"""portproxy-docker-proxy run exactly as dockerd runs docker-proxy: fd 3 a status pipe, fd 4 an
optional pre-bound socket. The cases follow docker-proxy's own test suite."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from tests.support.docker_proxy import DockerProxy, flags
from tests.support.traffic import (check_congestion_control_per_leg, check_udp_backend_appears_later,
                                   congestion_control_choice, echo_roundtrip, open_connection, start_server,
                                   udp_endpoint)
from tests.support.transparent import host_state, peer_reporter, seen_by_target


@pytest.fixture
def dockerproxy(topo):
    started: list[DockerProxy] = []

    def start(*args: str, listen_sock: socket.socket | None = None, env: dict[str, str] | None = None,
              fd3: int | None = None, fd4: int | None = None) -> DockerProxy:
        proxy = DockerProxy(topo.host, list(args), listen_sock, env, fd3, fd4)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


async def _tcp_echo_check(topo, host: str, port: int, payload: bytes = b"hello docker-proxy") -> None:
    assert await echo_roundtrip(topo.client, host, port, payload, timeout=10) == payload


def _bound(ns, family: int, kind: int, host: str, port: int) -> socket.socket:
    sock = ns.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    if kind == socket.SOCK_STREAM:
        sock.listen(128)
    return sock


async def test_tcp4_without_and_with_passed_listener(topo, tcp_echo, dockerproxy) -> None:
    plain = dockerproxy(*flags("tcp", "0.0.0.0", 9090, topo.container_ip, 8080))
    assert plain.status == b"0\n"
    await _tcp_echo_check(topo, topo.host_ip, 9090)
    passed = dockerproxy(*flags("tcp", "0.0.0.0", 9091, topo.container_ip, 8080), "-use-listen-fd",
                         listen_sock=_bound(topo.host, socket.AF_INET, socket.SOCK_STREAM, "0.0.0.0", 9091))
    assert passed.status == b"0\n"
    await _tcp_echo_check(topo, topo.host_ip, 9091)


async def test_tcp_half_close(topo, dockerproxy) -> None:
    async def reply_after_eof(reader, writer):
        data = await reader.read(-1)
        writer.write(b"got " + data)
        await writer.drain()
        writer.close()

    server = await start_server(topo.container, 8081, reply_after_eof)
    dockerproxy(*flags("tcp", "0.0.0.0", 9092, topo.container_ip, 8081))
    reader, writer = await open_connection(topo.client, topo.host_ip, 9092)
    writer.write(b"request")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(-1), 10) == b"got request"
    writer.close()
    server.close()


async def test_tcp6(topo, tcp_echo, dockerproxy) -> None:
    assert dockerproxy(*flags("tcp", "::", 9093, topo.container_ip6, 8080)).status == b"0\n"
    await _tcp_echo_check(topo, topo.host_ip6, 9093)


@pytest.mark.parametrize("proto", ["tcp", "udp"])
async def test_both_families_of_one_port_coexist(topo, tcp_echo, udp_echo, dockerproxy, proto: str) -> None:
    """What dockerd starts for ``-p 9094:8080``: 0.0.0.0 (IPv4 only) and :: (IPv6 only), both to
    the container's IPv4 address."""
    port = 5353 if proto == "udp" else 8080
    assert dockerproxy(*flags(proto, "0.0.0.0", 9094, topo.container_ip, port)).status == b"0\n"
    assert dockerproxy(*flags(proto, "::", 9094, topo.container_ip, port)).status == b"0\n"
    for dest in (topo.host_ip, topo.host_ip6):
        if proto == "tcp":
            await _tcp_echo_check(topo, dest, 9094)
        else:
            client = await udp_endpoint(topo.client, "::" if ":" in dest else "0.0.0.0")
            client.transport.sendto(b"to " + dest.encode(), (dest, 9094))
            assert (await client.recv())[0] == b"to " + dest.encode()


async def test_ipv6_host_listens_on_ipv6_only(topo, tcp_echo, dockerproxy) -> None:
    assert dockerproxy(*flags("tcp", "::", 9099, topo.container_ip, 8080)).status == b"0\n"
    await _tcp_echo_check(topo, topo.host_ip6, 9099)
    with pytest.raises(ConnectionRefusedError):
        await open_connection(topo.client, topo.host_ip, 9099)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@pytest.mark.parametrize("passed", [False, True])
async def test_udp(topo, udp_echo, dockerproxy, family: str, passed: bool) -> None:
    v6 = family == "ipv6"
    host, target, dest = ("::", topo.container_ip6, topo.host_ip6) if v6 else ("0.0.0.0", topo.container_ip, topo.host_ip)
    sock = _bound(topo.host, socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM, host, 5300) if passed else None
    args = flags("udp", host, 5300, target, 5353) + (["-use-listen-fd"] if passed else [])
    assert dockerproxy(*args, listen_sock=sock).status == b"0\n"
    client = await udp_endpoint(topo.client, "::" if v6 else "0.0.0.0")
    for i in range(3):
        client.transport.sendto(b"dgram %d" % i, (dest, 5300))
        data, _ = await client.recv()
        assert data == b"dgram %d" % i


async def test_udp_no_backend_at_first(topo, dockerproxy) -> None:
    proxy = dockerproxy(*flags("udp", "0.0.0.0", 5301, topo.container_ip, 5355))
    await check_udp_backend_appears_later(topo, 5301, 5355)
    assert proxy.proc.poll() is None


async def test_udp_one_sided_flow_keeps_source_port(topo, dockerproxy) -> None:
    sink = await udp_endpoint(topo.container, port=5356)
    dockerproxy(*flags("udp", "0.0.0.0", 5302, topo.container_ip, 5356))
    client = await udp_endpoint(topo.client)
    ports = set()
    for _ in range(6):
        client.transport.sendto(b"one way", (topo.host_ip, 5302))
        ports.add((await sink.recv())[1][1])
        await asyncio.sleep(0.3)
    assert len(ports) == 1


def test_failure_is_reported_on_fd3(topo, dockerproxy) -> None:
    holder = _bound(topo.host, socket.AF_INET, socket.SOCK_STREAM, "0.0.0.0", 9095)
    proxy = dockerproxy(*flags("tcp", "0.0.0.0", 9095, topo.container_ip, 8080))
    assert proxy.status.startswith(b"1\n") and b"9095/tcp: port is already in use" in proxy.status
    assert proxy.proc.wait(timeout=10) == 1
    holder.close()


async def test_target_cc_from_the_environment(topo, tcp_echo, dockerproxy) -> None:
    default, chosen = congestion_control_choice(topo.host)
    proxy = dockerproxy(*flags("tcp", "0.0.0.0", 9097, topo.container_ip, 8080), env={"PORTPROXY_TARGET_CC": chosen})
    assert proxy.status == b"0\n"
    await check_congestion_control_per_leg(topo, 9097, 8080, default, chosen)


def test_unknown_target_cc_is_reported_on_fd3(topo, dockerproxy) -> None:
    proxy = dockerproxy(*flags("tcp", "0.0.0.0", 9098, topo.container_ip, 8080),
                        env={"PORTPROXY_TARGET_CC": "no-such-cc"})
    assert proxy.status == b"1\nPORTPROXY_TARGET_CC 'no-such-cc' cannot be used: not available " \
                           b"(see /proc/sys/net/ipv4/tcp_available_congestion_control)"
    assert proxy.proc.wait(timeout=10) == 1
    assert "no-such-cc" in proxy.proc.stderr.read()


def test_sctp_gives_a_clear_error(topo, dockerproxy) -> None:
    proxy = dockerproxy(*flags("sctp", "0.0.0.0", 9096, topo.container_ip, 8080))
    assert proxy.status.startswith(b"1\nsctp: ")
    assert proxy.proc.wait(timeout=10) == 1


async def test_go_flag_syntax(topo, tcp_echo, dockerproxy) -> None:
    proxy = dockerproxy("--proto=tcp", "-host-ip=0.0.0.0", "--host-port", "9097", "-container-ip",
                        topo.container_ip, "--container-port=8080")
    assert proxy.status == b"0\n"
    await _tcp_echo_check(topo, topo.host_ip, 9097)


def test_stops_on_sigterm(topo, dockerproxy) -> None:
    proxy = dockerproxy(*flags("tcp", "0.0.0.0", 9098, topo.container_ip, 8080))
    assert proxy.stop() == 0


# --- fd 3: only a pipe open for writing is written --------------------------------------------------
async def _serves_without_status(topo, proxy: DockerProxy, port: int) -> None:
    """With no status pipe there is no readiness signal: wait for the port to answer."""
    for _ in range(100):
        try:
            await _tcp_echo_check(topo, topo.host_ip, port)
            break
        except (ConnectionRefusedError, asyncio.TimeoutError, TimeoutError):
            assert proxy.proc.poll() is None, proxy.proc.stderr.read()
            await asyncio.sleep(0.1)
    else:
        pytest.fail("the proxy never answered")
    assert proxy.stop() == 0


async def test_without_fd3_it_serves_and_stops_cleanly(topo, tcp_echo, dockerproxy) -> None:
    proxy = dockerproxy(*flags("tcp", "0.0.0.0", 9110, topo.container_ip, 8080), fd3=-1)
    await _serves_without_status(topo, proxy, 9110)


@pytest.mark.parametrize("kind", ["file", "pipe read end"])
async def test_fd3_that_is_not_a_writable_pipe_is_never_written(topo, tcp_echo, dockerproxy, tmp_path,
                                                                 kind: str) -> None:
    if kind == "file":
        fd = os.open(tmp_path / "unrelated", os.O_WRONLY | os.O_CREAT)
    else:
        fd, keep_w = os.pipe()
    try:
        proxy = dockerproxy(*flags("tcp", "0.0.0.0", 9111, topo.container_ip, 8080), fd3=fd)
        await _serves_without_status(topo, proxy, 9111)
    finally:
        os.close(fd)
    if kind == "file":
        assert (tmp_path / "unrelated").read_bytes() == b""
    else:
        os.set_blocking(keep_w, False)
        os.close(keep_w)


# --- fd 4 (-use-listen-fd): only a bound socket of the right kind; TCP made to listen ----------------
async def test_bound_but_not_listening_fd4_is_made_to_listen(topo, tcp_echo, dockerproxy) -> None:
    sock = topo.host.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", 9112))
    proxy = dockerproxy(*flags("tcp", "0.0.0.0", 9112, topo.container_ip, 8080), "-use-listen-fd", listen_sock=sock)
    assert proxy.status == b"0\n"
    await _tcp_echo_check(topo, topo.host_ip, 9112)


def _refused(proxy: DockerProxy, why: bytes) -> None:
    assert proxy.status.startswith(b"1\n-use-listen-fd: fd 4") and why in proxy.status, proxy.status
    assert proxy.proc.wait(timeout=20) == 1


@pytest.mark.parametrize("case", ["udp socket for tcp", "tcp socket for udp", "unbound", "connected udp"])
def test_unusable_fd4_sockets_are_refused(topo, dockerproxy, case: str) -> None:
    proto = "udp" if case in ("tcp socket for udp", "connected udp") else "tcp"
    kind = socket.SOCK_STREAM if case in ("tcp socket for udp", "unbound") else socket.SOCK_DGRAM
    sock = topo.host.socket(socket.AF_INET, kind)
    if case != "unbound":
        sock.bind(("0.0.0.0", 9113))
    if case == "connected udp":
        sock.connect(("127.0.0.1", 9))
    proxy = dockerproxy(*flags(proto, "0.0.0.0", 9113, topo.container_ip, 8080), "-use-listen-fd", listen_sock=sock)
    _refused(proxy, {"unbound": b"not bound", "connected udp": b"connected"}.get(case, b"is not an IP " + proto.encode()))


@pytest.mark.parametrize("case", ["closed", "not a socket"])
def test_fd4_that_is_no_socket_is_refused(topo, dockerproxy, tmp_path, case: str) -> None:
    fd = os.open(tmp_path / "file", os.O_RDWR | os.O_CREAT) if case == "not a socket" else None
    try:
        proxy = dockerproxy(*flags("tcp", "0.0.0.0", 9114, topo.container_ip, 8080), "-use-listen-fd", fd4=fd)
    finally:
        if fd is not None:
            os.close(fd)
    _refused(proxy, b"is not a socket" if fd is not None else b"Bad file descriptor")


# --- validation: what docker-proxy takes, minus what cannot be a published port ------------------------
@pytest.mark.parametrize("args,error", [
    (["-container-ip", "0.0.0.0"], b"1\n-container-ip 0.0.0.0: not a container address"),
    (["-container-ip", "::"], b"1\n-container-ip ::: not a container address"),
    (["-host-ip", "224.0.0.1"], b"1\n-host-ip 224.0.0.1: a multicast or broadcast address cannot be published"),
    (["-host-ip", "ff02::1"], b"1\n-host-ip ff02::1: a multicast or broadcast address cannot be published"),
    (["-host-port", "0"], b"1\n-host-port 0: not a port (1-65535)"),
    (["-container-port", "65536"], b"1\n-container-port 65536: not a port (1-65535)"),
    (["-host-port", "nine"], b'1\ninvalid value "nine" for flag -host-port: parse error'),
    (["-host-ip", "300.1.1.1"], b'1\ninvalid value "300.1.1.1" for flag -host-ip: invalid IP address: 300.1.1.1'),
    (["-proto", "icmp"], b"1\nunsupported protocol icmp"),
])
def test_refusals_are_reported_on_fd3(topo, dockerproxy, args: list[str], error: bytes) -> None:
    base = dict(zip(["-proto", "-host-ip", "-host-port", "-container-ip", "-container-port"],
                    ["tcp", "0.0.0.0", "9115", topo.container_ip, "8080"]))
    base.update(zip(args[::2], args[1::2]))
    proxy = dockerproxy(*[x for pair in base.items() for x in pair])
    assert proxy.status == error
    assert proxy.proc.wait(timeout=20) == (2 if b"invalid value" in error else 1)
    assert "Traceback" not in proxy.proc.stderr.read()


async def test_serves_at_normal_priority(topo, tcp_echo, dockerproxy) -> None:
    """The imports after readiness run at SCHED_IDLE; serving does not."""
    proxy = dockerproxy(*flags("tcp", "0.0.0.0", 9116, topo.container_ip, 8080))
    assert proxy.status == b"0\n"
    await _tcp_echo_check(topo, topo.host_ip, 9116)
    assert os.sched_getscheduler(proxy.proc.pid) == os.SCHED_OTHER


@pytest.mark.parametrize("env, message", [({"PORTPROXY_SOURCE": "elsewhere"}, b"PORTPROXY_SOURCE 'elsewhere' must be"),
                                          ({"PORTPROXY_PROXY_PROTOCOL": "v3"}, b"PORTPROXY_PROXY_PROTOCOL 'v3' must be")])
def test_environment_checked_by_the_options_schema(topo, dockerproxy, env, message) -> None:
    proxy = dockerproxy(*flags("tcp", "0.0.0.0", 9098, topo.container_ip, 8080), env=env)
    assert proxy.status.startswith(b"1\n" + message), proxy.status


async def test_transparent_drop_ins_share_one_routing(topo, dockerproxy) -> None:
    """PORTPROXY_SOURCE=client: the container sees the client; the routing stays while any
    drop-in of the namespace needs it and goes with the last one."""

    server = await start_server(topo.container, 8080, peer_reporter)
    try:
        env = {"PORTPROXY_SOURCE": "client"}
        first = dockerproxy(*flags("tcp", "0.0.0.0", 9201, topo.container_ip, 8080), env=env)
        second = dockerproxy(*flags("tcp", "0.0.0.0", 9202, topo.container_ip, 8080), env=env)
        assert first.status == second.status == b"0\n"
        for port in (9201, 9202):
            for _ in range(50):  # the drop-in reports ready before it serves (its lean start)
                try:
                    ip, _port, _local = await seen_by_target(topo.client, topo.host_ip, port)
                    break
                except (ConnectionRefusedError, ValueError):
                    await asyncio.sleep(0.1)
            assert ip == topo.client_ip
        first.proc.terminate()
        assert first.proc.wait(timeout=20) == 0
        assert host_state(topo)["rules"] == [7719, 7719]  # the second still needs it
        assert (await seen_by_target(topo.client, topo.host_ip, 9202))[0] == topo.client_ip
        second.proc.terminate()
        assert second.proc.wait(timeout=20) == 0
        assert host_state(topo)["rules"] == [] and host_state(topo)["routes"] == []
    finally:
        server.close()
