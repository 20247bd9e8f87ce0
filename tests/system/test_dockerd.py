"""The drop-in under a real dockerd (Debian 12's docker.io 20.10), with Debian's docker-proxy as
the reference: every case runs with both as ``userland-proxy-path``, with IPv6 off and on, and
with the drop-in delegating to a ``portproxy serve`` in dockerd's namespace (PORTPROXY_SOCKET in
dockerd's environment): then Docker's ports live in the daemon.

dockerd runs in the host namespace of the demo topology (see tests/support/dockerd.py for how it is
contained); clients reach the published ports from loopback there, from the client namespace
and from another container. The drop-in must pass every case docker-proxy passes; a case
docker-proxy itself fails is an xfail for docker-proxy only, with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.dockerd import BRIDGE_IP, PAGE, DockerUnavailable, Dockerd, docker_root, root_namespace_snapshot, \
    running_dockerd
from tests.support.processes import PortproxyProcess
from portproxy.lab.namespaces import Namespace
from portproxy.lab.topology import DemoTopology, demo_topology

DROPIN = str(Path(sys.executable).parent / "portproxy-docker-proxy")
PUBLISH = ("9090:8080", "127.0.0.1:9091:8080", "5353:5353/udp", "9100-9102:8100-8102", "[::]:9095:8080")
DOCKER_PROXY_UDP_SOURCE = ("docker-proxy 20.10 replies from the address the kernel picks for the route back, "
                           "not the one the client sent to: a connected UDP client drops the reply")


@pytest.fixture(scope="module")
def untouched_root_namespace() -> Iterator[None]:
    """The root namespace's links, addresses, routes, rules and nft ruleset, unchanged by the module."""
    if not Path("/usr/sbin/ip").exists() and not Path("/sbin/ip").exists():
        pytest.skip("needs iproute2")
    before = root_namespace_snapshot()
    yield
    assert root_namespace_snapshot() == before


class Setup:
    """One dockerd with a container publishing PUBLISH, and the namespaces around it."""

    def __init__(self, proxy: str, ipv6: bool, topo: DemoTopology, dockerd: Dockerd,
                 control_socket: Path | None = None) -> None:
        self.proxy, self.ipv6, self.topo, self.dockerd = proxy, ipv6, topo, dockerd
        self.control_socket = control_socket
        """The portproxy daemon's, when the drop-in delegates."""
        self.probed: dict[str, str] | None = None

    def mappings(self) -> dict[str, dict]:
        """``portproxy ls --json`` of the daemon, by spec."""
        done = self.portproxy("ls", "--json")
        return {m["spec"]: m for m in json.loads(done.stdout)["mappings"]}

    def portproxy(self, *args: str) -> subprocess.CompletedProcess:
        assert self.control_socket is not None
        done = subprocess.run([sys.executable, "-m", "portproxy", *args, "--socket", str(self.control_socket)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done

    def from_container(self, target: str) -> str:
        """Reach ``proto,host,port`` from another container (one probe container for all targets)."""
        if self.probed is None:
            targets = [f"tcp,{BRIDGE_IP},9090", f"udp,{BRIDGE_IP},5353", f"tcp,{self.topo.host_ip},9101",
                       f"udp,{self.topo.host_ip},5353"]
            if self.ipv6:
                targets += ["tcp,fd00:dead::1,9090", "udp,fd00:dead::1,5353"]
            self.probed = self.dockerd.probe(*targets)
        return self.probed[target]


@pytest.fixture(scope="module", params=[("docker-proxy", False), ("docker-proxy", True), ("portproxy", False),
                                        ("portproxy", True), ("delegated", False), ("delegated", True)],
                ids=["docker-proxy-ipv4", "docker-proxy-ipv6", "portproxy-ipv4", "portproxy-ipv6", "delegated-ipv4",
                     "delegated-ipv6"])
def setup(request, untouched_root_namespace, tmp_path_factory) -> Iterator[Setup]:
    if os.geteuid() != 0:
        pytest.skip("needs root for namespaces and dockerd")
    if not Path("/usr/bin/nsenter").exists():
        pytest.skip("needs nsenter (util-linux)")
    try:
        root = docker_root()
    except DockerUnavailable as exc:
        pytest.skip(str(exc))
    proxy, ipv6 = request.param
    path = str(root / "usr" / "sbin" / "docker-proxy") if proxy == "docker-proxy" else DROPIN
    tmp = tmp_path_factory.mktemp("dockerd")
    with contextlib.ExitStack() as stack:
        topo = stack.enter_context(demo_topology("pd"))
        control_socket, env = None, None
        if proxy == "delegated":  # a daemon in dockerd's network namespace, found through dockerd's environment
            control_socket = tmp / "pp.sock"
            (tmp / "portproxy.toml").write_text("")
            daemon = PortproxyProcess(topo.host, ["serve", "--config", str(tmp / "portproxy.toml"), "--state-dir",
                                                  str(tmp / "state"), "--socket", str(control_socket),
                                                  "--metrics-addr", "off"], ready_lines=1)
            stack.callback(lambda: daemon.stop() == 0 and "Traceback" not in daemon.stderr or
                           pytest.fail(f"portproxy serve: {daemon.stderr[-2000:]}"))
            env = {"PORTPROXY_SOCKET": str(control_socket)}
        dockerd = stack.enter_context(running_dockerd(topo.host, tmp, path, ipv6, env))
        started = dockerd.run_server(*PUBLISH, name="srv")
        assert started.returncode == 0, started.stderr
        yield Setup(proxy, ipv6, topo, dockerd, control_socket)
    # Nothing of it outside its namespaces: no mount in the root mount namespace, no cgroup.
    assert str(tmp) not in Path("/proc/1/mountinfo").read_text()
    assert not list(Path("/sys/fs/cgroup").glob(f"*/{dockerd.cgroup_parent}"))


# --- clients (blocking sockets on a thread inside a namespace) ----------------------------------------
def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def http_get(ns: Namespace, host: str, port: int) -> str:
    def get() -> str:
        with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect((host, port))
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return data.partition(b"\r\n\r\n")[2].decode()

    return ns.run(get)


def udp_roundtrip(ns: Namespace, host: str, port: int, payload: bytes = b"ping") -> bytes:
    """A connected UDP client, as resolvers use: a reply from another address is not taken."""
    def roundtrip() -> bytes:
        with socket.socket(_family(host), socket.SOCK_DGRAM) as sock:
            sock.settimeout(3)
            sock.connect((host, port))
            for _ in range(3):  # the first datagram may be lost while the flow is set up
                sock.send(payload)
                try:
                    return sock.recv(65536)
                except TimeoutError:
                    continue
            raise TimeoutError(f"no UDP reply from {host}:{port}")

    return ns.run(roundtrip)


def refused(ns: Namespace, host: str, port: int) -> bool:
    try:
        http_get(ns, host, port)
    except ConnectionRefusedError:
        return True
    return False


# --- reachability -----------------------------------------------------------------------------------
@pytest.mark.parametrize("host,port", [("127.0.0.1", 9090), ("::1", 9090), ("127.0.0.1", 9091),
                                       ("127.0.0.1", 9100), ("127.0.0.1", 9101), ("::1", 9102), ("::1", 9095)])
def test_tcp_from_loopback(setup: Setup, host: str, port: int) -> None:
    assert http_get(setup.topo.host, host, port) == PAGE


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_udp_from_loopback(setup: Setup, host: str) -> None:
    assert udp_roundtrip(setup.topo.host, host, 5353) == b"ping"


@pytest.mark.parametrize("v6,port", [(False, 9090), (True, 9090), (False, 9100), (False, 9101), (False, 9102),
                                     (True, 9101), (True, 9095)])
def test_tcp_from_client_namespace(setup: Setup, v6: bool, port: int) -> None:
    host = setup.topo.host_ip6 if v6 else setup.topo.host_ip
    assert http_get(setup.topo.client, host, port) == PAGE


@pytest.mark.parametrize("v6", [False, True])
def test_udp_from_client_namespace(setup: Setup, v6: bool) -> None:
    host = setup.topo.host_ip6 if v6 else setup.topo.host_ip
    assert udp_roundtrip(setup.topo.client, host, 5353, b"x" * 1200) == b"x" * 1200


def test_host_address_limits_the_listener(setup: Setup) -> None:
    """127.0.0.1:9091 is loopback only; [::]:9095 is IPv6 only, as docker-proxy listens."""
    assert refused(setup.topo.client, setup.topo.host_ip, 9091)
    assert refused(setup.topo.host, "::1", 9091)
    assert refused(setup.topo.client, setup.topo.host_ip, 9095)
    assert refused(setup.topo.host, "127.0.0.1", 9095)


@pytest.mark.parametrize("target", ["tcp,{bridge},9090", "udp,{bridge},5353", "tcp,{host},9101", "udp,{host},5353",
                                    "tcp,fd00:dead::1,9090", "udp,fd00:dead::1,5353"])
def test_from_another_container(setup: Setup, target: str, request) -> None:
    target = target.format(bridge=BRIDGE_IP, host=setup.topo.host_ip)
    if "fd00:dead" in target and not setup.ipv6:
        pytest.skip("containers have no IPv6 address with IPv6 off")
    if target.startswith("udp,198.") and setup.proxy == "docker-proxy":
        request.applymarker(pytest.mark.xfail(reason=DOCKER_PROXY_UDP_SOURCE, strict=True))
    expected = PAGE if target.startswith("tcp") else f"ping {target}"
    assert setup.from_container(target) == expected


# --- life cycle ---------------------------------------------------------------------------------------
def _wait_for(predicate, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def _proxies_for(setup: Setup, port: int) -> list[str]:
    return [cmd for cmd in setup.dockerd.proxies() if f"-host-port {port} " in cmd]


@pytest.mark.parametrize("how", ["stop", "rm -f"])
def test_container_end_leaves_no_proxy(setup: Setup, how: str) -> None:
    port = 9200 if how == "stop" else 9210
    name = f"end-{port}"
    started = setup.dockerd.run_server(f"{port}:8080", f"{port + 1}:5353/udp", name=name)
    assert started.returncode == 0, started.stderr
    assert len(_proxies_for(setup, port)) == 2 and len(_proxies_for(setup, port + 1)) == 2
    assert http_get(setup.topo.client, setup.topo.host_ip, port) == PAGE
    if how == "stop":
        setup.dockerd.docker("stop", "-t", "1", name)
    else:
        setup.dockerd.docker("rm", "-f", name)
    assert _wait_for(lambda: not _proxies_for(setup, port) and not _proxies_for(setup, port + 1)), \
        setup.dockerd.proxies()
    assert refused(setup.topo.client, setup.topo.host_ip, port)
    setup.dockerd.docker("rm", "-f", name, check=False)


def test_port_in_use_is_a_clear_error(setup: Setup) -> None:
    holder = setup.topo.host.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        holder.bind(("0.0.0.0", 9300))
        holder.listen()
        started = setup.dockerd.run_server("9300:8080", name="busy")
        assert started.returncode != 0
        assert "userland proxy" in started.stderr and "9300" in started.stderr
        assert "already in use" in started.stderr, started.stderr
        assert _wait_for(lambda: not _proxies_for(setup, 9300)), setup.dockerd.proxies()
    finally:
        holder.close()
        setup.dockerd.docker("rm", "-f", "busy", check=False)


# --- delegated: Docker's ports live in the daemon ------------------------------------------------------
@pytest.fixture
def delegated(setup: Setup) -> Setup:
    if setup.proxy != "delegated":
        pytest.skip("only with a portproxy daemon")
    return setup


def test_docker_ports_are_in_ls(delegated: Setup) -> None:
    ip = delegated.dockerd.container_ip("srv")
    listing = delegated.mappings()
    for host, target in (("0.0.0.0:9090", "8080/tcp"), ("[::]:9090", "8080/tcp"), ("127.0.0.1:9091", "8080/tcp"),
                         ("0.0.0.0:5353", "5353/udp"), ("0.0.0.0:9101", "8101/tcp"), ("[::]:9095", "8080/tcp")):
        found = [m for spec, m in listing.items() if spec.startswith(host + ":") and spec.endswith(":" + target)]
        assert len(found) == 1, (host, listing)
        assert found[0]["source"] == "docker" and found[0]["owner"]["kind"] == "docker"
        # IPv4 container address, or with --ipv6 its IPv6 one for [::] (dockerd's choice)
        assert found[0]["owner"]["container"].endswith(":" + target.split("/")[0])
    assert f"0.0.0.0:9090:{ip}:8080/tcp" in listing
    # The proxies dockerd sees are small waiting shells, one per port and family, not interpreters.
    waiting = delegated.dockerd.proxies()
    assert waiting and all(" -c trap " in cmd for cmd in waiting), waiting


def _open_then_get(ns: Namespace, host: str, port: int):
    """A connection opened now, whose request is sent (and answer read) later."""
    sock = ns.run(socket.socket, _family(host), socket.SOCK_STREAM)
    sock.settimeout(10)
    ns.run(sock.connect, (host, port))

    def finish() -> str:
        with sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return data.partition(b"\r\n\r\n")[2].decode()

    return finish


def test_a_transfer_survives_kernel_and_back(delegated: Setup) -> None:
    topo, ip = delegated.topo, delegated.dockerd.container_ip("srv")
    spec = f"0.0.0.0:9090:{ip}:8080/tcp"
    on_proxy = _open_then_get(topo.client, topo.host_ip, 9090)
    delegated.portproxy("switch", spec, "--mode", "kernel")
    assert delegated.mappings()[spec]["kernel"] is not None
    on_kernel = _open_then_get(topo.client, topo.host_ip, 9090)
    assert http_get(topo.client, topo.host_ip, 9090) == PAGE
    delegated.portproxy("switch", spec, "--mode", "userland")
    assert http_get(topo.client, topo.host_ip, 9090) == PAGE
    assert on_proxy() == PAGE and on_kernel() == PAGE


def test_docker_rm_removes_the_mapping_from_the_daemon(delegated: Setup) -> None:
    started = delegated.dockerd.run_server("9220:8080", name="gone")
    assert started.returncode == 0, started.stderr
    ip = delegated.dockerd.container_ip("gone")
    assert f"0.0.0.0:9220:{ip}:8080/tcp" in delegated.mappings()
    delegated.dockerd.docker("rm", "-f", "gone")
    assert _wait_for(lambda: not any(":9220:" in spec for spec in delegated.mappings())), delegated.mappings()
    assert refused(delegated.topo.client, delegated.topo.host_ip, 9220)
