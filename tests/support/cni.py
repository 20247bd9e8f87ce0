"""What the CNI tests share: their fixtures (root namespace unchanged, the plugin cache, a
topology of their own), the chain they run, servers in containers and the clients that ask them,
and a ``portproxy serve`` the plugin registers with."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest

from portproxy.lab.namespaces import Namespace
from portproxy.lab.topology import DemoTopology, demo_topology
from tests.support.cni_testbed import (DAEMON_CONFIG, Chain, ReferenceUnavailable, debian_plugins, plugin_dir,
                                      root_snapshot)
from tests.support.processes import PortproxyProcess

WEB = [{"hostPort": 9090, "containerPort": 8080, "protocol": "tcp"},
       {"hostPort": 9053, "containerPort": 5353, "protocol": "udp"}]


@pytest.fixture(autouse=True)
def root_unchanged() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    before = root_snapshot()
    yield
    assert root_snapshot() == before, "the root network namespace changed"


@pytest.fixture(scope="module")
def cache() -> Path:
    try:
        return debian_plugins()
    except ReferenceUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def topo() -> Iterator[DemoTopology]:
    with demo_topology("pc") as t:
        yield t


def make_chain(topo: DemoTopology, cache: Path, tmp_path: Path, mapper: str, version: str = "1.0.0",
               **kwargs: object) -> Chain:
    if mapper == "portproxy-cni":
        # Daemonless, whatever this machine has at the default socket path (tests/netns/test_cni_daemon.py
        # covers the daemon): a socket file that is not there.
        kwargs["mapper_conf"] = {"daemonSocket": str(tmp_path / "no-daemon.sock"), **kwargs.get("mapper_conf", {})}
    plugins = plugin_dir(tmp_path / "bin", cache)
    return Chain(topo.host, plugins, cache, tmp_path / "ipam", mapper, version, **kwargs)  # type: ignore[arg-type]


def container(topo: DemoTopology) -> Namespace:
    ns = Namespace.create("pc-ctr")
    topo.extra.append(ns)
    return ns


class Servers:
    """Dual-stack TCP and UDP servers in a container that answer ``TAG PEER``, and TCP echo
    servers (``echo``) for connections that must live across a change."""

    def __init__(self, ns: Namespace, tag: str, tcp: list[int], udp: list[int], echo: tuple[int, ...] = ()) -> None:
        self.tag = tag
        self.socks: list[socket.socket] = []
        for port in tcp:
            self._start(ns, socket.SOCK_STREAM, port, self._serve_tcp)
        for port in udp:
            self._start(ns, socket.SOCK_DGRAM, port, self._serve_udp)
        for port in echo:
            self._start(ns, socket.SOCK_STREAM, port, self._serve_echo)

    def _start(self, ns: Namespace, kind: int, port: int, loop) -> None:  # type: ignore[no-untyped-def]
        sock = ns.socket(socket.AF_INET6, kind)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
        if kind == socket.SOCK_STREAM:
            sock.listen(64)
        self.socks.append(sock)
        threading.Thread(target=loop, args=(sock,), daemon=True).start()

    def _answer(self, peer: str) -> bytes:
        return f"{self.tag} {peer.removeprefix('::ffff:')}".encode()

    def _serve_tcp(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, peer = sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(64)
                conn.sendall(self._answer(peer[0]))

    def _serve_echo(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)

    def _serve_udp(self, sock: socket.socket) -> None:
        while True:
            try:
                _, peer = sock.recvfrom(64)
                sock.sendto(self._answer(peer[0]), peer)
            except OSError:
                return

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


def family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def ask_tcp(ns: Namespace, host: str, port: int) -> str:
    """What the server behind host:port answers, or an exception name."""
    with ns.socket(family(host), socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        try:
            sock.connect((host, port))
            sock.sendall(b"hello")
            return sock.recv(256).decode()
        except OSError as exc:
            return type(exc).__name__


def ask_udp(ns: Namespace, host: str, port: int, source_port: int = 0) -> str:
    with ns.socket(family(host), socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.bind(("::" if ":" in host else "0.0.0.0", source_port))
        for _ in range(3):
            try:
                sock.sendto(b"hello", (host, port))
                return sock.recv(256).decode()
            except OSError as exc:
                answer = type(exc).__name__
        return answer


def addresses(result: dict) -> tuple[str, str]:
    ips = [ip["address"].split("/")[0] for ip in result["ips"]]
    return next(ip for ip in ips if ":" not in ip), next(ip for ip in ips if ":" in ip)


def check_stale_udp_flow_flushed(topo: DemoTopology, chain: Chain) -> None:
    web = container(topo)
    assert ask_udp(topo.client, topo.host_ip, 9053, source_port=40053) != "web"  # creates the conntrack entry
    chain.add("ctr-web", web.name, WEB)
    servers = Servers(web, "web", [], [5353])
    try:
        assert ask_udp(topo.client, topo.host_ip, 9053, source_port=40053) == f"web {topo.client_ip}"
    finally:
        servers.close()
    chain.delete("ctr-web", web.name, WEB)


METRICS = "127.0.0.1:9464"


class Daemon:
    """``portproxy serve`` in the host namespace; started, stopped and restarted by the test."""

    def __init__(self, topo: DemoTopology, tmp: Path) -> None:
        self.topo = topo
        self.socket = tmp / "pp.sock"
        self.config = tmp / "portproxy.toml"
        self.config.write_text(DAEMON_CONFIG)
        self.state = tmp / "state"
        self.procs: list[PortproxyProcess] = []

    def start(self) -> PortproxyProcess:
        proc = PortproxyProcess(self.topo.host, ["serve", "--config", str(self.config), "--state-dir", str(self.state),
                                                 "--socket", str(self.socket), "--metrics-addr", METRICS], 1)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            assert proc.stop() == 0, proc.stderr

    def ls(self) -> list[dict]:
        got = subprocess.run([sys.executable, "-m", "portproxy", "ls", "--json", "--socket", str(self.socket)],
                             capture_output=True, text=True, timeout=60)
        assert got.returncode == 0, got.stderr
        return json.loads(got.stdout)["mappings"]

    def metrics(self) -> str:
        host, port = METRICS.split(":")
        with self.topo.host.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect((host, int(port)))
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return data.decode()
