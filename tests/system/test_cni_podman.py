"""Real podman (Debian 12's 4.3, CNI backend) publishing ports through portproxy-cni, and through
Debian's stock portmap as the reference.

podman is extracted, not installed (``apt-get download`` + ``dpkg -x`` by portproxy.debcache),
and every podman call runs in one private mount namespace held by a sleeping process, inside
the test's host network namespace: ``/run`` and ``/var/lib`` are fresh tmpfs there (podman's
netns files, its runroot, libcni's cache), storage, config and the CNI conflist live in a
temporary directory, and the container is image-free (``--rootfs`` on a busybox-static
tree). Pitfalls of this VM handled here: a hybrid cgroup v1/v2 layout makes crun refuse, so
the private namespace mounts cgroup2 on /sys/fs/cgroup and podman runs with cgroups
disabled; crun may not raise RLIMIT_NPROC, so the default ulimits are the current ones
(nproc capped at pid_max).

A container exiting by itself gets its CNI DEL from conmon, which runs podman's exit
command ``podman --root .. --runroot .. --tmpdir .. --network-config-dir .. --network-backend
cni --runtime crun --storage-driver vfs --events-backend none ... container cleanup <id>``
with conmon's own environment (podman gives conmon PATH, HOME, CONTAINERS_CONF,
XDG_RUNTIME_DIR and LC_* only). The testbed's conmon is a wrapper adding LD_LIBRARY_PATH (the
extracted podman needs libsubid and libgpgme) and XTABLES_LIBDIR (portmap's iptables), so
that command runs unchanged, in the same mount and network namespace; the runroot is
short (podman refuses a ``--runroot`` flag over 50 characters).
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.cni_testbed import Podman, ReferenceUnavailable, debian_plugins, podman_packages
from portproxy.lab.topology import demo_topology
from tests.support.cni import Daemon, root_unchanged  # noqa: F401 - the autouse root-namespace check, shared


@pytest.fixture(scope="module")
def caches() -> tuple[Path, Path]:
    try:
        return podman_packages(), debian_plugins()
    except ReferenceUnavailable as exc:
        pytest.skip(str(exc))


DAEMON = "portproxy-cni+daemon"
"""portproxy-cni registering the mappings with a ``portproxy serve`` in the host namespace."""


DAEMON_OF = pytest.StashKey["Daemon | None"]()
"""The test's ``portproxy serve`` (with the DAEMON mapper), None otherwise."""


@pytest.fixture(params=["portmap", "portproxy-cni", DAEMON])
def podman(request: pytest.FixtureRequest, caches: tuple[Path, Path], tmp_path: Path) -> Iterator[Podman]:
    with demo_topology("pcp") as topo:
        topo.host.sysctl("net/ipv4/ip_forward", "1")
        daemon, conf = None, {}
        if request.param == DAEMON:
            daemon = Daemon(topo, tmp_path)
            daemon.start()
            conf = {"daemonSocket": str(daemon.socket)}
        request.node.stash[DAEMON_OF] = daemon
        p = Podman(topo, tmp_path, caches[0], caches[1], request.param.split("+")[0], conf)
        try:
            yield p
        finally:
            p.close()
            if daemon is not None:
                daemon.stop()


def http_get(ns, host: str, port: int) -> str:  # type: ignore[no-untyped-def]
    """The body of GET / from inside ``ns``, or the exception's name."""
    with ns.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        try:
            sock.connect((host, port))
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
            return data.split(b"\r\n\r\n", 1)[-1].decode()
        except OSError as exc:
            return type(exc).__name__


def eventually(fn, expected: str, timeout: float = 10) -> str:  # type: ignore[no-untyped-def]
    """httpd in a fresh container may need a moment to listen; retry until it answers."""
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got == expected or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


HELLO = "hello from podman\n"


def published(topo, port: int) -> bool:  # type: ignore[no-untyped-def]
    """Whether the host namespace's nft ruleset (iptables-nft's rules included, as portmap
    writes them) names ``port``: a stopped container's port must be gone, not merely unanswered."""
    got = subprocess.run(["ip", "netns", "exec", topo.host.name, "nft", "list", "ruleset"], capture_output=True,
                         text=True, timeout=30)
    return re.search(rf"(dport|\.) {port}\b", got.stdout) is not None


def test_podman_run_publish(podman: Podman) -> None:
    topo = podman.topo
    podman.run_web("web", "9090:8080")
    assert eventually(lambda: http_get(topo.client, topo.host_ip, 9090), HELLO) == HELLO
    assert http_get(topo.host, "127.0.0.1", 9090) == HELLO
    assert http_get(topo.host, topo.host_ip, 9090) == HELLO
    assert podman.get_from_container(topo.host_ip, 9090) == HELLO  # another container: hairpin
    assert published(topo, 9090)
    podman("stop", "-t", "0", "web")
    assert not published(topo, 9090)
    assert http_get(topo.client, topo.host_ip, 9090) == "ConnectionRefusedError"
    assert http_get(topo.host, "127.0.0.1", 9090) == "ConnectionRefusedError"


def udp_ask(ns, host: str, port: int) -> str:  # type: ignore[no-untyped-def]
    """The answer to one datagram sent from inside ``ns``, or the exception's name."""
    with ns.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1)
        try:
            sock.sendto(b"?", (host, port))
            return sock.recv(512).decode()
        except OSError as exc:
            return type(exc).__name__


def test_podman_run_publish_udp(podman: Podman) -> None:
    """``-p 9053:5353/udp``: datagrams from a client namespace and from the host reach the
    container with the sender's address, and the replies come back; stop removes it."""
    topo = podman.topo
    podman.run_udp("dns", "9053:5353/udp")
    assert eventually(lambda: udp_ask(topo.client, topo.host_ip, 9053), f"udp {topo.client_ip}",
                      timeout=30) == f"udp {topo.client_ip}"
    assert udp_ask(topo.host, topo.host_ip, 9053).startswith("udp ")
    assert published(topo, 9053)
    podman("stop", "-t", "0", "dns")
    assert not published(topo, 9053)
    assert udp_ask(topo.client, topo.host_ip, 9053) != f"udp {topo.client_ip}"


def test_podman_two_containers_and_a_clash(podman: Podman) -> None:
    topo = podman.topo
    podman.run_web("a", "10000-10010:8080-8090")
    podman.run_web("b", "10020:8080")
    assert eventually(lambda: http_get(topo.client, topo.host_ip, 10000), HELLO) == HELLO
    assert eventually(lambda: http_get(topo.client, topo.host_ip, 10020), HELLO) == HELLO
    clash = podman("run", "-d", "--cgroups=disabled", "--name", "c", "-p", "10020:8080", "--rootfs",
                   str(podman.rootfs), "/bin/httpd", "-f", "-p", "8080", check=False)
    # podman sets the network up before conmon binds the ports: portproxy-cni refuses the port
    # held by another container first; with portmap (last writer wins) conmon's bind fails.
    assert clash.returncode != 0
    assert any(why in clash.stderr for why in ("already published", "overlap", "address already in use"))
    podman("rm", "-f", "-t", "0", "a")
    assert not published(topo, 10000) and published(topo, 10020)
    assert http_get(topo.client, topo.host_ip, 10000) == "ConnectionRefusedError"
    assert http_get(topo.client, topo.host_ip, 10020) == HELLO


def test_podman_network_reload(podman: Podman) -> None:
    """``network reload`` sends DEL then ADD: the mapping is back and still served."""
    topo = podman.topo
    podman.run_web("web", "9090:8080")
    assert eventually(lambda: http_get(topo.client, topo.host_ip, 9090), HELLO) == HELLO
    podman("network", "reload", "web")
    assert published(topo, 9090)
    assert eventually(lambda: http_get(topo.client, topo.host_ip, 9090), HELLO) == HELLO
    podman("rm", "-f", "-t", "0", "web")
    assert not published(topo, 9090)


SERVE_ONCE = ("/bin/nc", "-l", "-p", "8080", "-e", "/bin/httpd", "-i", "-h", "/www")
"""Serve one HTTP request (busybox httpd in inetd mode behind ``nc -l``), then exit."""


def test_podman_self_exit(podman: Podman, request: pytest.FixtureRequest) -> None:
    """A container whose process exits by itself loses its mapping: conmon's exit command
    (``podman container cleanup``) sends the DEL, and the port can be published again."""
    topo, daemon = podman.topo, request.node.stash[DAEMON_OF]
    cid = podman("run", "-d", "--cgroups=disabled", "--name", "once", "-p", "9090:8080", "--rootfs",
                 str(podman.rootfs), *SERVE_ONCE).stdout.strip()
    if daemon is not None:
        assert {m["owner"]["id"] for m in daemon.ls()} == {cid}
    assert eventually(lambda: http_get(topo.client, topo.host_ip, 9090), HELLO) == HELLO
    # podman says "stopped" once it sees the exit and "exited" once cleanup tore the network down
    state = eventually(lambda: podman("inspect", "--format", "{{.State.Status}}", "once").stdout.strip(), "exited",
                       timeout=120)
    assert state == "exited"
    assert not published(topo, 9090)
    if daemon is not None:
        assert daemon.ls() == []
    assert http_get(topo.client, topo.host_ip, 9090) == "ConnectionRefusedError"
    podman.run_web("again", "9090:8080")
    assert eventually(lambda: http_get(topo.client, topo.host_ip, 9090), HELLO) == HELLO
    assert published(topo, 9090)
