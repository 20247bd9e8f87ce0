"""Runs a set of mappings on one event loop: binds, starts, drains and stops their listeners.

Adding a mapping binds every port of its range before any of them starts, so a
port in use fails the whole mapping with one clear error and nothing half-started;
the mappings already running are not touched.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import Union

from ..errors import Conflict
from ..spec import Mapping, format_endpoint
from .options import ProxyOptions
from .poller import Poller
from .splice import PipePool
from .stats import TcpStats, UdpStats
from .tcp import TcpListener
from .udp import UdpListener

log = logging.getLogger("portproxy.proxy")

Listener = Union[TcpListener, UdpListener]


class ProxyError(Conflict):
    """A mapping could not be started; the message is one readable line."""


def bind_socket(mapping: Mapping, port: int, backlog: int, reuse_port: bool = False) -> socket.socket:
    """Create and bind (and for TCP, listen on) the host side of one port of a mapping."""
    ip = mapping.listen_ip()
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    kind = socket.SOCK_STREAM if mapping.proto == "tcp" else socket.SOCK_DGRAM
    where = f"{format_endpoint(ip, port)}/{mapping.proto}"
    try:
        sock = socket.socket(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    except OSError as exc:
        raise ProxyError(f"cannot listen on {where}: {exc.strerror}") from None
    try:
        if mapping.proto == "tcp":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            # Lets the controller open a loopback listener beside a wildcard one (or the
            # reverse) before closing the old one, so a switch never refuses a client.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if mapping.dual_stack else 1)
        if mapping.host_ip is not None and not mapping.host_ip.is_unspecified:
            # Like docker-proxy, allow binding an address that is not (yet) configured.
            sock.setsockopt(socket.SOL_IP, getattr(socket, "IP_FREEBIND", 15), 1)
        sock.bind((str(ip), port))
        if mapping.proto == "tcp":
            sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ProxyError(f"cannot listen on {where}: port is already in use") from None
        if exc.errno == errno.EACCES:
            raise ProxyError(f"cannot listen on {where}: permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)") from None
        raise ProxyError(f"cannot listen on {where}: {exc.strerror}") from None
    return sock


def listener_name(mapping: Mapping, host_port: int, target_port: int) -> str:
    return (
        f"{mapping.proto} {format_endpoint(mapping.listen_ip(), host_port)} -> "
        f"{format_endpoint(mapping.target_ip, target_port)}"
    )


class ProxyServer:
    """All userland mappings of one process."""

    def __init__(self, loop: asyncio.AbstractEventLoop, options: ProxyOptions) -> None:
        self.loop = loop
        self.options = options
        self.pipe_pool = PipePool(options.pipe_size, options.pipe_pool_max) if options.splice else None
        self.poller = Poller(loop)
        self.listeners: dict[Mapping, list[Listener]] = {}
        self.stats: dict[Mapping, list[TcpStats | UdpStats]] = {}
        """Counters per mapping and port, kept across listener changes (a switch away and
        back reuses them) so exported counters never go backwards; see forget_stats."""
        self.retired: list[TcpListener] = []
        """Closed TCP listeners whose connections are still running (after a switch)."""
        self.reuse_port = False
        self.adopted: dict[tuple[str, str, int], socket.socket] = {}
        """Sockets handed over by a supervisor (systemd socket activation), by (proto, ip,
        port). They are used instead of binding and never closed here: the supervisor
        holds a copy, and a mapping that comes back to userland reuses the same one."""

    def adopt(self, sock: socket.socket) -> tuple[str, str, int]:
        """Remember a passed socket for the mapping that listens where it is bound."""
        proto = "tcp" if sock.type == socket.SOCK_STREAM else "udp"
        ip, port = sock.getsockname()[:2]
        key = (proto, str(ip), int(port))
        self.adopted[key] = sock
        return key

    def add(self, mapping: Mapping, sockets: dict[int, socket.socket] | None = None) -> list[Listener]:
        """Bind and start every port of ``mapping``; raise ProxyError with nothing started.

        ``sockets`` may supply already bound sockets by host port (socket activation,
        docker-proxy's -use-listen-fd); the other ports are bound here.
        """
        if mapping in self.listeners:
            raise ProxyError(f"mapping {mapping} is already running")
        given = dict(sockets or {})
        bound: list[socket.socket] = []
        try:
            for host_port, _ in mapping.port_pairs():
                sock = given.pop(host_port, None) or self.adopted.get((mapping.proto, str(mapping.listen_ip()), host_port))
                if sock is None:
                    sock = bind_socket(mapping, host_port, self.options.listen_backlog, self.reuse_port)
                sock.setblocking(False)
                bound.append(sock)
        except ProxyError:
            for sock in bound:
                if sock not in self.adopted.values():
                    sock.close()
            raise
        listeners: list[Listener] = []
        stats = self.stats.setdefault(
            mapping, [TcpStats() if mapping.proto == "tcp" else UdpStats() for _ in range(mapping.port_count)])
        for sock, (host_port, target_port), port_stats in zip(bound, mapping.port_pairs(), stats):
            target = (str(mapping.target_ip), target_port)
            name = listener_name(mapping, host_port, target_port)
            listener: Listener
            if mapping.proto == "tcp":
                assert isinstance(port_stats, TcpStats)
                listener = TcpListener(self.loop, sock, target, name, self.options, self.pipe_pool, self.poller,
                                       port_stats)
            else:
                assert isinstance(port_stats, UdpStats)
                listener = UdpListener(self.loop, sock, target, name, self.options, port_stats)
            listener.owned = sock not in self.adopted.values()
            listener.start()
            listeners.append(listener)
        self.listeners[mapping] = listeners
        return listeners

    def forget_stats(self, mapping: Mapping) -> None:
        """Drop a mapping's counters (it is gone for good: its series should disappear)."""
        self.stats.pop(mapping, None)

    def retire(self, mapping: Mapping) -> None:
        """Close a mapping's listeners at once but let its live connections run to their end.

        Used when traffic for the port has moved elsewhere (to the kernel path): the
        accept queue is emptied first, so a handshake that completed before the move
        is relayed rather than reset.
        """
        for listener in self.listeners.pop(mapping):
            if isinstance(listener, TcpListener):
                listener.accept_pending()
                listener.close_listener()
                if listener.connections:
                    self.retired.append(listener)
            else:
                listener.close()
        self.retired = [listener for listener in self.retired if listener.connections]

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Stop every mapping (graceful: live connections get up to drain_timeout)."""
        listeners: list[Listener] = [listener for group in self.listeners.values() for listener in group]
        listeners += self.retired
        self.listeners.clear()
        self.retired = []
        await self._drain(listeners, self.options.drain_timeout if drain_timeout is None else drain_timeout)
        if self.pipe_pool is not None:
            self.pipe_pool.close()
        self.poller.close()

    async def _drain(self, listeners: list[Listener], timeout: float) -> None:
        tcp = [listener for listener in listeners if isinstance(listener, TcpListener)]
        for listener in listeners:
            if isinstance(listener, TcpListener):
                listener.close_listener()  # idempotent: retired listeners are closed already
            else:
                listener.close()
        deadline = self.loop.time() + timeout
        while any(listener.connections for listener in tcp) and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        left = sum(len(listener.connections) for listener in tcp)
        if left:
            log.info("drain timeout: closing %d connection(s) still open", left)
        for listener in tcp:
            listener.abort_connections()

    def connection_count(self) -> int:
        live = [listener for group in self.listeners.values() for listener in group]
        return sum(len(listener.connections) for listener in live + self.retired if isinstance(listener, TcpListener))
