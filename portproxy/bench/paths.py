"""The ways from the client to the container's servers, each started in the host namespace.

A *path* publishes a list of forwards (host port → container port, protocol) and
reports which processes do the relaying, so their CPU time and memory can be read.
Peers are started the way their users start them: docker-proxy as dockerd does (a
process per port and protocol, readiness on fd 3), HAProxy in TCP mode with
splicing, socat with a child per connection.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from .. import debcache
from ..kernel.builders import FAMILY, KernelOptions, delete_table
from ..kernel.executor import Nft
from ..lab.namespaces import Namespace
from ..lab.topology import DemoTopology
from ..proxy.options import congestion_control_error
from .procfs import default_congestion_control, descendants
from .servers import HTTP, HTTP_PROXY_PROTOCOL_PORT

Forward = tuple[int, int, str]
"""(host port, container port, "tcp" | "udp")"""


class PathError(RuntimeError):
    """A path could not be started."""


@dataclasses.dataclass
class Running:
    """A started path: its processes, and which of them relay bytes."""

    procs: list[subprocess.Popen] = dataclasses.field(default_factory=list)
    relay_pids: list[int] = dataclasses.field(default_factory=list)
    cleanup: list[Callable[[], None]] = dataclasses.field(default_factory=list)

    def stop(self) -> None:
        """Stop every process *group*: socat's per-peer children outlive their parent.

        Returns once they are all gone: children busy with full socket buffers took a
        few seconds after SIGKILL, and the next measurement (or a test counting the
        tools' processes) must not see them."""
        children = [child for proc in self.procs for child in descendants(proc.pid)]
        for proc in self.procs:
            _signal_group(proc, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
            _signal_group(proc, signal.SIGKILL)  # whatever of the group is left
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        for step in self.cleanup:
            step()


def _alive(pid: int) -> bool:
    """Running (not yet a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)  # every path process leads its own group (GROUP)
    except ProcessLookupError:
        pass


GROUP = {"start_new_session": True}
"""Popen arguments for a path's processes, so that stop() reaches their children too."""


Starter = Callable[[DemoTopology, list[Forward]], Running]


@dataclasses.dataclass(frozen=True)
class PathDef:
    key: str
    label: str
    protocols: frozenset[str]
    start: Starter | None  # None: direct routing, nothing to start
    in_kernel: bool = False  # the relaying is done by the kernel (no process to charge)
    process_per_port: bool = False  # docker-proxy, socat: the RSS of N ports is N processes
    process_per_connection: bool = False  # socat forks for each connection
    fds_per_connection: int = 2  # what one idle relayed connection holds open
    memory: bool = True  # False: a tuning variant whose memory is another path's
    services: frozenset[str] | None = None  # the container services it can carry (None: all)


# --- readiness -----------------------------------------------------------------------------------
def wait_listening(ns: Namespace, address: str, forwards: list[Forward], procs: list[subprocess.Popen]) -> None:
    """Wait until every TCP forward accepts a connection (UDP ones get a short grace)."""
    waiting = [host_port for host_port, _, proto in forwards if proto == "tcp"]

    def not_accepting(ports: list[int]) -> list[int]:
        left = []
        for port in ports:
            with socket.socket() as s:
                s.settimeout(0.5)
                if s.connect_ex((address, port)) != 0:
                    left.append(port)
        return left

    deadline = time.monotonic() + 10.0 + 0.01 * len(waiting)
    while waiting:
        waiting = ns.run(not_accepting, waiting)
        if not waiting:
            break
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            program = debcache.program_of(procs[0].args) if procs else "path"
            raise PathError(f"{program} is not listening on {waiting[0]}/tcp")
        time.sleep(0.05)
    if any(proto == "udp" for _, _, proto in forwards):
        time.sleep(0.2)


def listening(topo: DemoTopology, forwards: list[Forward], running: Running) -> Running:
    """Hand ``running`` over once it listens on every forward; stop it if it never does."""
    try:
        wait_listening(topo.host, topo.host_ip, forwards, running.procs)
    except PathError:
        running.stop()
        raise
    return running


# --- portproxy ------------------------------------------------------------------------------------
def portproxy_starter(*extra: str, kernel: bool = False, ports: dict[int, int] | None = None) -> Starter:
    """``ports``: container ports to dial instead of the services' own (e.g. nginx's PROXY listener)."""
    def start(topo: DemoTopology, forwards: list[Forward]) -> Running:
        specs = [f"{hp}:{topo.container_ip}:{(ports or {}).get(tp, tp)}/{proto}" for hp, tp, proto in forwards]
        argv = [sys.executable, "-m", "portproxy", "map", *specs, *extra, "--log-level", "warning"]
        if kernel:
            argv += ["--mode", "kernel"]
        proc = topo.host.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **GROUP)
        assert proc.stdout is not None
        for _ in specs:
            if not proc.stdout.readline().startswith("ready"):
                proc.kill()
                why = proc.communicate()[1].strip()[-300:]
                if kernel and remove_leftover_table(topo):
                    why += " (it left its nftables table behind; removed)"
                raise PathError(f"portproxy did not start: {why}")
        if not kernel:
            return Running([proc], [proc.pid])
        return Running([proc], [], [lambda: _warn_if_left(remove_leftover_table(topo))])

    return start


def remove_leftover_table(topo: DemoTopology) -> bool:
    """Delete the kernel path's nftables table from the host namespace if a process left it.

    A ``portproxy map --mode kernel`` that dies (an abort, SIGKILL) leaves its DNAT rules
    in place, and every later path published on the same host ports would be bypassed
    by them: the server would see its connections, the relay none. True if one was there."""
    def remove() -> bool:
        nft = Nft()
        opts = KernelOptions()
        if not nft.table_exists(FAMILY, opts.table):
            return False
        nft.apply(delete_table(opts))
        return True

    return topo.host.run(remove)


def _warn_if_left(left: bool) -> None:
    if left:
        print("portproxy bench: the kernel path left its nftables table behind on exit; removed", file=sys.stderr)


# --- docker-proxy ---------------------------------------------------------------------------------
def find_docker_proxy() -> list[str] | None:
    """docker-proxy from Debian's docker.io, unpacked with dpkg -x (never installed), or $DOCKER_PROXY."""
    override = os.environ.get("DOCKER_PROXY")
    if override:
        return [override] if os.access(override, os.X_OK) else None
    return debcache.available("docker-proxy")


def docker_proxy_starter(binary: list[str]) -> Starter:
    def start(topo: DemoTopology, forwards: list[Forward]) -> Running:
        running = Running()
        for hp, tp, proto in forwards:
            # dockerd gives docker-proxy a pipe as fd 3 and waits for "0\n" (or "1\n<error>").
            r, w = os.pipe()
            argv = [*binary, "-proto", proto, "-host-ip", "0.0.0.0", "-host-port", str(hp),
                    "-container-ip", topo.container_ip, "-container-port", str(tp)]
            running.procs.append(topo.host.popen(argv, fds={3: w}, stdout=subprocess.DEVNULL,
                                                 stderr=subprocess.DEVNULL, **GROUP))
            os.close(w)
            with os.fdopen(r) as status:
                answer = status.read(2)
            if answer.startswith("1"):
                running.stop()
                raise PathError(f"docker-proxy refused {hp}/{proto}")
        running.relay_pids = [p.pid for p in running.procs]
        return listening(topo, forwards, running)

    return start


# --- HAProxy --------------------------------------------------------------------------------------
HAPROXY_FDS = 20_000
"""This machine's hard fd limit. HAProxy refuses to start unless 2 fds per connection,
its splice pipes and its listeners fit under it."""

HAPROXY_GLOBAL = """\
global
    maxconn {maxconn}
    maxpipes 500
    ulimit-n {fds}
    nbthread 1
defaults
    mode tcp
    option splice-auto
    timeout connect 5s
    timeout client 1h
    timeout server 1h
"""


def haproxy_starter(haproxy: list[str]) -> Starter:
    return lambda topo, forwards: start_haproxy(haproxy, topo, forwards)


def start_haproxy(haproxy: list[str], topo: DemoTopology, forwards: list[Forward]) -> Running:
    tmp = tempfile.mkdtemp(prefix="portproxy-bench-haproxy-")
    maxconn = min(9000, (HAPROXY_FDS - 1100 - len(forwards)) // 2)  # 8,000 idle connections fit
    config = [HAPROXY_GLOBAL.format(maxconn=maxconn, fds=HAPROXY_FDS)]
    for hp, tp, _proto in forwards:
        config.append(f"listen p{hp}\n    bind 0.0.0.0:{hp}\n    server s {topo.container_ip}:{tp}\n")
    path = Path(tmp) / "haproxy.cfg"
    path.write_text("\n".join(config))
    proc = topo.host.popen([*haproxy, "-db", "-f", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           **GROUP)
    running = Running([proc], [proc.pid], [lambda: shutil.rmtree(tmp, ignore_errors=True)])
    return listening(topo, forwards, running)


# --- socat ----------------------------------------------------------------------------------------
def socat_starter(socat: list[str]) -> Starter:
    return lambda topo, forwards: start_socat(socat, topo, forwards)


def start_socat(socat: list[str], topo: DemoTopology, forwards: list[Forward]) -> Running:
    running = Running()
    for hp, tp, proto in forwards:
        if proto == "tcp":
            argv = [*socat, f"TCP-LISTEN:{hp},fork,reuseaddr,backlog=4096", f"TCP:{topo.container_ip}:{tp}"]
        else:
            argv = [*socat, f"UDP-LISTEN:{hp},fork,reuseaddr", f"UDP:{topo.container_ip}:{tp}"]
        running.procs.append(topo.host.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **GROUP))
    running.relay_pids = [p.pid for p in running.procs]  # children's CPU is charged to them once reaped
    return listening(topo, forwards, running)


# --- the list ---------------------------------------------------------------------------------------
BOTH = frozenset({"tcp", "udp"})

DIRECT = "direct"
KERNEL = "kernel"
SPLICE = "userland-splice"
SPLICE_CUBIC = "userland-target-cubic"
TRANSPARENT = "userland-transparent"
PROXY_V2 = "userland-proxy-v2"
DOCKER_PROXY = "docker-proxy"
AUTO = "auto"


def available_paths(only: list[str] | None = None) -> list[PathDef]:
    """Every path this machine can run (peers only where their program is present)."""
    paths = [
        PathDef(DIRECT, "direct routing (no NAT)", BOTH, None, in_kernel=True),
        PathDef(KERNEL, "portproxy kernel (nftables DNAT)", BOTH, portproxy_starter(kernel=True), in_kernel=True),
        PathDef(SPLICE, "portproxy userland, splice (uvloop)", BOTH, portproxy_starter()),
        PathDef("userland-copy", "portproxy userland, copy (uvloop)", BOTH, portproxy_starter("--no-splice")),
        PathDef("userland-asyncio", "portproxy userland, splice (asyncio loop)", BOTH,
                portproxy_starter("--loop", "asyncio")),
    ]
    if default_congestion_control() not in ("cubic", "unknown") and congestion_control_error("cubic") is None:
        # The one documented tuning: on a host whose default is bbr (this kind of VM image),
        # the target leg without bbr's pacing. TCP only: UDP does not use it.
        paths.insert(3, PathDef(SPLICE_CUBIC, "portproxy userland, splice, --target-cc cubic", frozenset({"tcp"}),
                                portproxy_starter("--target-cc", "cubic"), memory=False))
    paths += [
        # Transparent mode: the servers see the client's address; every workload runs unchanged.
        PathDef(TRANSPARENT, "portproxy userland, splice, --source client", BOTH,
                portproxy_starter("--source", "client"), memory=False),
        # Auto mode: each service's mapping starts on the proxy and moves itself to DNAT once its
        # load crosses the thresholds; connections opened before a move stay on the proxy.
        PathDef(AUTO, "portproxy auto (userland while light, hybrid while hot)", BOTH,
                portproxy_starter("--mode", "auto"), memory=False),
        # A PROXY header only nginx's proxy_protocol listener understands: connection rate only.
        PathDef(PROXY_V2, "portproxy userland, splice, --proxy-protocol v2", frozenset({"tcp"}),
                portproxy_starter("--proxy-protocol", "v2", ports={HTTP.port: HTTP_PROXY_PROTOCOL_PORT}),
                memory=False, services=frozenset({HTTP.name})),
    ]
    wanted = set(only) if only else None
    if wanted is None or DOCKER_PROXY in wanted:
        binary = find_docker_proxy()
        if binary:
            # Go's splice keeps a pipe per direction for the life of a connection: 6 fds.
            paths.append(PathDef(DOCKER_PROXY, "docker-proxy (Debian docker.io)", BOTH, docker_proxy_starter(binary),
                                 process_per_port=True, fds_per_connection=6))
    if (wanted is None or "haproxy" in wanted) and (haproxy := debcache.available("haproxy")):
        paths.append(PathDef("haproxy", "HAProxy (TCP mode, splice)", frozenset({"tcp"}), haproxy_starter(haproxy)))
    if (wanted is None or "socat" in wanted) and (socat := debcache.available("socat")):
        paths.append(PathDef("socat", "socat (fork per connection)", BOTH, socat_starter(socat), process_per_port=True,
                             process_per_connection=True))
    return [p for p in paths if wanted is None or p.key in wanted]
