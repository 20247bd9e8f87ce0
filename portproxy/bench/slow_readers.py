"""Kernel memory that clients which connect and never read can make a path pin.

A server in the container writes to every connection as fast as it will take; N
clients connect through the path and read nothing. Once every buffer on the way is
full, the figure is what stays pinned:

* **socket memory**: for every TCP socket in the client, host and container
  namespaces, the ``skmem`` of ``ss -tm``: ``r`` (receive queue) + ``w`` (send queue)
  + ``f`` (memory reserved ahead). That is exactly what the kernel charges against
  ``tcp_mem`` (whose pressure threshold is the host-wide harm), counted per namespace
  so other programs on the machine do not blur it. /proc/net/sockstat's ``TCP: mem``
  would be the same quantity but host-wide (it is not per namespace).
* **pipe contents**: bytes waiting in the relay processes' pipes (splice), read with
  FIONREAD on a copy of each pipe fd taken with pidfd_getfd. Spliced pages may be
  shared with socket buffers and are counted as their bytes, a slight under-count of
  the pages a pipe holds.

Direct routing (no proxy) is the yardstick: a proxy adds a second connection and its
own buffers; the target is at most twice what direct routing pins.
"""

from __future__ import annotations

import array
import ctypes
import fcntl
import os
import re
import selectors
import socket
import subprocess
import termios
import threading
import time

from ..lab.namespaces import Namespace
from ..lab.topology import DemoTopology
from . import procfs
from .checks import held_through_relay
from .memory import container_listener
from .paths import PathDef, PathError
from .servers import FIREHOSE

SLOW_READER_PORT = 2100
_SKMEM = re.compile(r"skmem:\(r(\d+),rb\d+,t\d+,tb\d+,f(\d+),w(\d+)")
_SYS_PIDFD_GETFD = 438
_CHUNK = bytes(1 << 16)


class Firehose:
    """Accepts connections in the container and writes to each as fast as it takes."""

    def __init__(self, topo: DemoTopology) -> None:
        self.listener = container_listener(topo, FIREHOSE.port)
        self.listener.setblocking(False)
        self.accepted: list[socket.socket] = []
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.listener, selectors.EVENT_READ)
        self._stop = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="firehose", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            with self._lock:  # drop_all() closes connections from another thread
                for key, _ in self._selector.select(0.2):
                    conn = key.fileobj
                    assert isinstance(conn, socket.socket)
                    if conn is self.listener:
                        self._accept()
                        continue
                    try:
                        conn.send(_CHUNK)
                    except BlockingIOError:
                        pass
                    except OSError:
                        self._selector.unregister(conn)
            time.sleep(0)  # let drop_all() in

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            self.accepted.append(conn)
            self._selector.register(conn, selectors.EVENT_WRITE)

    def drop_all(self) -> None:
        with self._lock:
            for conn in self.accepted:
                try:
                    self._selector.unregister(conn)
                except (KeyError, ValueError):
                    pass
                conn.close()
            self.accepted = []

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=5)
        self.drop_all()
        self._selector.close()
        self.listener.close()


def socket_memory(ns: Namespace) -> int:
    """Bytes the kernel charges for the connected TCP sockets of a namespace (r + w + f)."""
    out, _ = ns.popen(["ss", "-tmHn"], stdout=subprocess.PIPE, text=True).communicate(timeout=30)
    return sum(int(r) + int(f) + int(w) for r, f, w in _SKMEM.findall(out))


def pipe_bytes(pids: list[int]) -> int:
    """Bytes waiting in the pipes these processes (and their children) hold."""
    libc = ctypes.CDLL(None, use_errno=True)
    total = 0
    seen: set[str] = set()
    for pid in {p for top in pids for p in (top, *procfs.descendants(top))}:
        try:
            pidfd = os.pidfd_open(pid)
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        try:
            for fd in fds:
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if not link.startswith("pipe:") or link in seen:
                    continue
                seen.add(link)
                local = libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(fd), 0)
                if local < 0:
                    continue
                try:
                    count = array.array("i", [0])
                    fcntl.ioctl(local, termios.FIONREAD, count)
                    total += count[0]
                finally:
                    os.close(local)
        finally:
            os.close(pidfd)
    return total


def memory_pressures(ns: Namespace) -> int:
    """TcpExt TCPMemoryPressures of a namespace: how often its sockets found the host's
    TCP memory (tcp_mem, host-wide) past its pressure threshold, where the kernel stops
    growing buffers. A run that hit it understates what a path pins."""
    out, _ = ns.popen(["cat", "/proc/net/netstat"], stdout=subprocess.PIPE, text=True).communicate(timeout=30)
    lines = [line.split() for line in out.splitlines() if line.startswith("TcpExt:")]
    if len(lines) < 2 or "TCPMemoryPressures" not in lines[0]:
        return 0
    return int(lines[1][lines[0].index("TCPMemoryPressures")])


def _pinned(topo: DemoTopology, pids: list[int]) -> dict[str, int]:
    return {"client": socket_memory(topo.client), "host": socket_memory(topo.host),
            "container": socket_memory(topo.container), "pipes": pipe_bytes(pids)}


def pinned_by_slow_readers(topo: DemoTopology, firehose: Firehose, path: PathDef, count: int,
                           settle: float = 30.0) -> dict[str, float]:
    """Open ``count`` never-reading clients through ``path``; the memory pinned once full."""
    if path.start is None:
        host, port, pids, running = topo.container_ip, FIREHOSE.port, [], None
    else:
        running = path.start(topo, [(SLOW_READER_PORT, FIREHOSE.port, "tcp")])
        host, port, pids = topo.host_ip, SLOW_READER_PORT, [p.pid for p in running.procs]
    clients: list[socket.socket] = []
    pressures = sum(memory_pressures(ns) for ns in topo.namespaces())
    relayed = running is not None and not path.in_kernel
    sockets_before = procfs.socket_count(pids) if relayed else 0
    try:
        clients = topo.client.run(lambda: [socket.socket() for _ in range(count)])
        for s in clients:
            s.setblocking(False)
            s.connect_ex((host, port))
        deadline = time.monotonic() + 30
        while len(firehose.accepted) < count:
            if time.monotonic() > deadline:
                raise PathError(f"{path.key}: only {len(firehose.accepted)} of {count} slow readers reached the server")
            time.sleep(0.05)
        if relayed:
            held_through_relay(path.key, procfs.socket_count(pids) - sockets_before, count)
        # Full once the total stops growing: three samples 0.5 s apart within 1 %.
        samples = [sum(_pinned(topo, pids).values())]
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline:
            time.sleep(0.5)
            samples.append(sum(_pinned(topo, pids).values()))
            last = samples[-3:]
            if len(last) == 3 and max(last) - min(last) <= 0.01 * max(last):
                break
        parts = _pinned(topo, pids)
        pressures = sum(memory_pressures(ns) for ns in topo.namespaces()) - pressures
    finally:
        for s in clients:
            s.close()
        firehose.drop_all()
        if running is not None:
            running.stop()
    total = sum(parts.values())
    result = {f"{where}_mib": n / (1 << 20) for where, n in parts.items()}
    result.update(total_mib=total / (1 << 20), kib_per_client=total / 1024 / count, clients=float(count),
                  memory_pressures=float(pressures))
    return result
