"""portproxy-docker-proxy run exactly as dockerd runs docker-proxy: fd 3 a status pipe, fd 4 an
optional pre-bound socket. The cases follow docker-proxy's own test suite."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (check_congestion_control_per_leg, check_udp_backend_appears_later, congestion_control_choice,
                      echo_roundtrip, open_connection, start_server, udp_endpoint)

DROPIN = str(Path(sys.executable).parent / "portproxy-docker-proxy")


class DockerProxy:
    """One drop-in process started the way dockerd does it."""

    def __init__(self, ns, args: list[str], listen_sock: socket.socket | None = None,
                 env: dict[str, str] | None = None) -> None:
        status_r, status_w = os.pipe()
        fds = {3: status_w}
        if listen_sock is not None:
            fds[4] = listen_sock.fileno()
        self.proc = ns.popen([DROPIN, *args], fds=fds, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **(env or {})})
        os.close(status_w)
        if listen_sock is not None:
            listen_sock.close()  # the child has its own copy, as with dockerd
        with os.fdopen(status_r, "rb") as status:
            self.status = status.read()  # returns when the child closes fd 3

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture
def dockerproxy(topo):
    started: list[DockerProxy] = []

    def start(*args: str, listen_sock: socket.socket | None = None, env: dict[str, str] | None = None) -> DockerProxy:
        proxy = DockerProxy(topo.host, list(args), listen_sock, env)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def flags(proto: str, host_ip: str, host_port: int, container_ip: str, container_port: int) -> list[str]:
    return ["-proto", proto, "-host-ip", host_ip, "-host-port", str(host_port),
            "-container-ip", container_ip, "-container-port", str(container_port)]


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


async def test_ipv6_host_ip_listens_ipv6_only(topo, tcp_echo, dockerproxy) -> None:
    """As docker-proxy: dockerd starts a sibling for 0.0.0.0, so [::] must leave IPv4 alone."""
    assert dockerproxy(*flags("tcp", "::", 9094, topo.container_ip6, 8080)).status == b"0\n"
    with pytest.raises(ConnectionRefusedError):
        await open_connection(topo.client, topo.host_ip, 9094)


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
    assert proxy.status == b"1\nPORTPROXY_TARGET_CC: TCP congestion control 'no-such-cc': not available " \
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


def test_version_and_bad_flags() -> None:
    for flag in ("-v", "--version"):
        out = subprocess.run([DROPIN, flag], capture_output=True, text=True, timeout=20)
        assert out.returncode == 0 and out.stdout.startswith("portproxy-docker-proxy")
    out = subprocess.run([DROPIN, "-bogus"], capture_output=True, text=True, timeout=20)
    assert out.returncode == 2 and "flag provided but not defined: -bogus" in out.stderr


def test_stops_on_sigterm(topo, dockerproxy) -> None:
    proxy = dockerproxy(*flags("tcp", "0.0.0.0", 9098, topo.container_ip, 8080))
    assert proxy.stop() == 0
