"""Delegation: the docker-proxy drop-in hands its socket to a real ``portproxy serve`` in
the demo topology and becomes a small waiting process; the mapping lives as long as that process.

The drop-in is started as dockerd starts it (fd 3 a status pipe), with PORTPROXY_SOCKET pointing
at the test daemon's control socket, beside which the delegate socket is.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.traffic import open_connection, start_server
from portproxy.controller.delegate import delegate_path
from portproxy.dockerproxy import Request, delegation_request, \
    parse_go_flags
from tests.support.control import ls, metrics_text, roundtrip, wait_for
from tests.support.docker_proxy import DockerProxy, flags
from tests.support.transparent import peer_reporter, seen_by_target


@pytest.fixture
def delegated(topo, daemon):
    """Start drop-ins that find the test daemon; each is stopped (if still running) at teardown."""
    start, _cli = daemon
    started: list[DockerProxy] = []

    def run(*args: str, ns=None, listen_sock: socket.socket | None = None, env: dict | None = None) -> DockerProxy:
        proxy = DockerProxy(ns or topo.host, list(args), listen_sock,
                            env={"PORTPROXY_SOCKET": str(start.socket), **(env or {})})
        started.append(proxy)
        return proxy

    yield run
    for proxy in started:
        proxy.stop()


def _exe(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/exe")


# --- against a real daemon --------------------------------------------------------------------------------
async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes) -> None:
    writer.write(payload)
    assert await asyncio.wait_for(reader.readexactly(len(payload)), 10) == payload


async def test_delegated_port_is_the_daemons_and_switches_live(topo, tcp_echo, daemon, delegated) -> None:
    start, cli = daemon
    proc = start()
    spec = f"0.0.0.0:9090:{topo.container_ip}:8080/tcp"
    proxy = delegated(*flags("tcp", "0.0.0.0", 9090, topo.container_ip, 8080))
    assert proxy.status == b"0\n", proxy.proc.stderr
    python = os.path.realpath(f"/proc/{os.getpid()}/exe")
    await wait_for(lambda: _exe(proxy.proc.pid) != python, 10, "the waiting process to be a shell")
    await roundtrip(topo, 9090)
    entry = ls(cli)[spec]
    assert entry["source"] == "docker" and entry["mode"] == "userland"
    assert entry["owner"]["kind"] == "docker" and entry["owner"]["container"] == f"{topo.container_ip}:8080"
    table = cli("ls")
    assert f"docker:docker-proxy[{proxy.proc.pid}]" in table.stdout, table.stdout
    assert f'listen="0.0.0.0:9090",proto="tcp",target="{topo.container_ip}:8080"' in metrics_text(topo)
    # A transfer started on the proxy survives a switch to kernel and back; new connections too.
    reader, writer = await open_connection(topo.client, topo.host_ip, 9090)
    await _echo(reader, writer, b"before")
    assert (await asyncio.to_thread(cli, "switch", spec, "--mode", "kernel")).returncode == 0
    await _echo(reader, writer, b"on kernel")
    await roundtrip(topo, 9090)
    assert ls(cli)[spec]["kernel"] is not None
    assert (await asyncio.to_thread(cli, "switch", spec, "--mode", "hybrid")).returncode == 0
    await roundtrip(topo, 9090)
    assert (await asyncio.to_thread(cli, "switch", spec, "--mode", "userland")).returncode == 0
    await _echo(reader, writer, b"back")
    await roundtrip(topo, 9090)
    writer.close()
    # dockerd stops a proxy with SIGINT (SIGTERM when it dies itself): exit 0, mapping gone.
    proxy.proc.send_signal(signal.SIGINT)
    assert proxy.proc.wait(timeout=10) == 0
    await wait_for(lambda: spec not in ls(cli), 10, "the mapping to go")
    with pytest.raises(ConnectionRefusedError):
        await open_connection(topo.client, topo.host_ip, 9090)
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
async def test_whatever_ends_the_waiting_process_removes_the_mapping(topo, tcp_echo, udp_echo, daemon, delegated,
                                                                     how) -> None:
    start, cli = daemon
    start()
    tcp = delegated(*flags("tcp", "::", 9091, topo.container_ip, 8080))  # 6 -> 4: proxied
    udp = delegated(*flags("udp", "0.0.0.0", 5353, topo.container_ip, 5353))
    assert tcp.status == udp.status == b"0\n"
    await roundtrip(topo, 9091, topo.host_ip6)
    listing = ls(cli)
    assert {f"[::]:9091:{topo.container_ip}:8080/tcp", f"0.0.0.0:5353:{topo.container_ip}:5353/udp"} <= set(listing)
    tcp.proc.send_signal(how)
    tcp.proc.wait(timeout=10)
    await wait_for(lambda: len(ls(cli)) == 1, 10, "the TCP mapping to go")
    assert ls(cli)[f"0.0.0.0:5353:{topo.container_ip}:5353/udp"]["status"] == "running"
    udp.proc.send_signal(how)
    udp.proc.wait(timeout=10)
    await wait_for(lambda: not ls(cli), 10, "the UDP mapping to go")
    # The ports are free again: a new delegation of the same port works, here with the socket
    # bound by dockerd (-use-listen-fd, fd 4), not yet listening.
    bound = topo.host.socket(socket.AF_INET6, socket.SOCK_STREAM)
    bound.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    bound.bind(("::", 9091))
    again = delegated(*flags("tcp", "::", 9091, topo.container_ip, 8080), "-use-listen-fd", listen_sock=bound)
    assert again.status == b"0\n"
    await roundtrip(topo, 9091, topo.host_ip6)


async def test_a_daemon_restart_does_not_resurrect_docker_ports(topo, tcp_echo, daemon, delegated) -> None:
    start, cli = daemon
    first = start()
    proxy = delegated(*flags("tcp", "0.0.0.0", 9092, topo.container_ip, 8080))
    assert proxy.status == b"0\n"
    await roundtrip(topo, 9092)
    assert first.stop() == 0
    # The waiting process sees the delegation end and leaves (dockerd has nothing left to stop).
    assert proxy.proc.wait(timeout=10) == 1
    assert "ended the delegation" in proxy.proc.stderr.read()
    start()
    assert ls(cli) == {}
    assert "docker" not in start.state.read_text()


def _raw_request(path: Path, data: bytes, fds: list[int]) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
        conn.settimeout(15)
        conn.connect(str(path))
        socket.send_fds(conn, [data], fds)
        return conn.recv(4096).decode()


def test_bad_requests_get_one_line(topo, daemon, delegated) -> None:
    start, cli = daemon
    start(f'[[mapping]]\nspec = "9093:{topo.container_ip}:8080"\n')
    path = delegate_path(start.socket)
    assert (path.stat().st_mode & 0o777) == 0o660
    good = delegation_request(Request(parse_go_flags(flags("tcp", "0.0.0.0", 9094, topo.container_ip, 8080))), 1)
    wrong_port = topo.host.socket(socket.AF_INET, socket.SOCK_STREAM)
    wrong_port.bind(("0.0.0.0", 0))
    try:
        for data, fds, message in [
            (b"{nope", [], "not JSON"),
            (b'{"spec": "9094:1.2.3.4:80"}', [], '"spec", "owner"'),
            (good, [], "exactly one socket"),
            (good, [wrong_port.fileno(), wrong_port.fileno()], "exactly one socket"),
            (good, [wrong_port.fileno()], "bound to port"),
            (good.replace(b"0.0.0.0:9094", b"9094"), [wrong_port.fileno()], "one port with a host address"),
            (good, [os.open("/dev/null", os.O_RDONLY)], "delegation failed"),
        ]:
            answer = json.loads(_raw_request(path, data, fds))
            assert message in answer["error"] and "\n" not in answer["error"], answer
    finally:
        wrong_port.close()
    # A port the daemon already serves: the drop-in reports the daemon's line on fd 3 and exits 1.
    busy = delegated(*flags("tcp", "0.0.0.0", 9093, topo.container_ip, 8080))
    assert busy.status.startswith(b"1\n") and b"9093" in busy.status, busy.status
    assert busy.proc.wait(timeout=10) == 1
    assert set(ls(cli)) == {f"9093:{topo.container_ip}:8080/tcp"}


async def test_a_dropin_in_another_namespace_serves_in_process(topo, tcp_echo, daemon, delegated) -> None:
    """The socket file is reachable from every network namespace; the daemon serves only its own."""
    start, cli = daemon
    start()
    proxy = delegated(*flags("tcp", "0.0.0.0", 9095, topo.bridge_ip, 9999), ns=topo.client)
    assert proxy.status == b"0\n"
    assert proxy.proc.poll() is None and ls(cli) == {}
    proxy.proc.terminate()
    assert proxy.proc.wait(timeout=10) == 0


def test_docker_ports_benchmark_runs(tmp_path) -> None:
    """benchmarks/docker_ports.py end to end at a few ports (the figures belong to the benchmark)."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "docker_ports.py"
    out = tmp_path / "docker_ports.json"
    done = subprocess.run([sys.executable, str(script), "--ports", "3", "--sample", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())["results"]
    assert {"drop-in standalone", "drop-in delegated"} <= set(results)
    assert results["drop-in delegated"]["ports_measured"] == 3 and results["drop-in delegated"]["daemon_pss_kib"] > 0
    assert "| drop-in delegated |" in done.stdout


async def test_options_from_dockerds_environment_go_along(topo, daemon, delegated) -> None:
    """PORTPROXY_SOURCE=client in dockerd's environment: the daemon's mapping is transparent."""

    start, cli = daemon
    start()
    server = await start_server(topo.container, 8080, peer_reporter)
    try:
        proxy = delegated(*flags("tcp", "0.0.0.0", 9095, topo.container_ip, 8080), env={"PORTPROXY_SOURCE": "client"})
        assert proxy.status == b"0\n", proxy.proc.stderr
        assert ls(cli)[f"0.0.0.0:9095:{topo.container_ip}:8080/tcp"]["options"] == {"source": "client"}
        assert (await seen_by_target(topo.client, topo.host_ip, 9095))[0] == topo.client_ip
    finally:
        server.close()
