"""Memory: resident set with many mappings, and per idle connection.

RSS is what an operator sees in ``ps`` and what a container's memory limit counts;
socket buffers live in the kernel and are not in it, for any path alike.
"""

from __future__ import annotations

import resource
import socket
import threading
import time

from ..lab.topology import DemoTopology
from . import procfs
from .checks import Unmeasured, held_through_relay, rss_per_connection_kib
from .paths import Forward, PathDef, PathError
from .servers import SINK

MAPPING_BASE_PORT = 2000  # published ports stay below the ephemeral range (topology.EPHEMERAL_LOW)
SAMPLED_PROCESSES = 20  # for paths that need a process per mapping, start this many and scale


def idle_connections_for(path: PathDef, wanted: int) -> int:
    """How many idle connections a path can hold here, at most ``wanted``.

    A process per connection (socat): a few hundred tell its cost. Otherwise as many as
    the fd hard limit allows at the path's fds per connection (docker-proxy: 6, so it
    tops out near a sixth of the limit)."""
    if path.process_per_connection:
        return min(wanted, 200)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return min(wanted, (hard - 500) // path.fds_per_connection // 100 * 100)


def rss_with_mappings(topo: DemoTopology, path: PathDef, count: int) -> dict[str, float]:
    """RSS of everything the path runs to publish ``count`` TCP ports."""
    assert path.start is not None
    sampled = min(count, SAMPLED_PROCESSES) if path.process_per_port else count
    forwards: list[Forward] = [(MAPPING_BASE_PORT + i, SINK.port, "tcp") for i in range(sampled)]
    running = path.start(topo, forwards)
    try:
        time.sleep(0.5)
        pids = [p.pid for p in running.procs]
        gone = [p.pid for p in running.procs if p.poll() is not None]
        if gone:
            raise Unmeasured(f"{path.key}: {len(gone)} of its {len(pids)} processes exited before their memory "
                             "was read")
        total_kib = procfs.rss_tree_kib(pids)
    finally:
        running.stop()
    if total_kib <= 0:
        raise Unmeasured(f"{path.key}: no resident memory could be read")
    return {"rss_mib": total_kib * count / sampled / 1024, "processes": float(len(pids) * count // sampled),
            "sampled": float(sampled)}


def container_listener(topo: DemoTopology, port: int) -> socket.socket:
    """A TCP listener on every address of the container, for a server of the harness's own."""
    listener = topo.container.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(8192)
    return listener


class IdleSink:
    """Accepts connections in the container and holds them, reading nothing."""

    def __init__(self, topo: DemoTopology) -> None:
        self.listener = container_listener(topo, SINK.port)
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, name="idle-sink", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def drop_all(self) -> None:
        for conn in self.accepted:
            conn.close()
        self.accepted = []

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._thread.join(timeout=5)
        self.drop_all()


def rss_per_idle_connection(topo: DemoTopology, sink: IdleSink, path: PathDef, count: int) -> dict[str, float]:
    """Open ``count`` connections through the path, all idle, and divide the RSS growth.

    The server counting ``count`` connections is not enough: the relay itself must
    hold them (a socket pair each), or the RSS difference is of nothing."""
    assert path.start is not None
    host_port = MAPPING_BASE_PORT
    running = path.start(topo, [(host_port, SINK.port, "tcp")])
    clients: list[socket.socket] = []
    try:
        time.sleep(0.3)
        pids = [p.pid for p in running.procs]
        before = procfs.rss_tree_kib(pids)
        sockets_before = procfs.socket_count(pids)
        batch = 500
        for start in range(0, count, batch):
            n = min(batch, count - start)
            made = topo.client.run(lambda: [socket.socket() for _ in range(n)])
            for s in made:
                s.setblocking(False)
                s.connect_ex((topo.host_ip, host_port))
            clients += made
            _wait_for(lambda: len(sink.accepted) >= start + n, 30,
                      f"{path.key}: only {len(sink.accepted)} of {start + n} connections reached the sink")
        time.sleep(1.0)
        after = procfs.rss_tree_kib(pids)
        held = procfs.socket_count(pids) - sockets_before
    finally:
        for s in clients:
            s.close()
        sink.drop_all()  # both ends gone: the proxy has nothing left to drain when it stops
        running.stop()
    held_through_relay(path.key, held, count)
    return {"kib_per_connection": rss_per_connection_kib(before, after, count), "rss_before_mib": before / 1024,
            "rss_after_mib": after / 1024, "connections": float(count), "relay_sockets_opened": float(held)}


def _wait_for(condition, timeout: float, message: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise PathError(message)
        time.sleep(0.02)
