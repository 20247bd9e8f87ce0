"""Runs a set of mappings on one event loop: binds, serves, holds, drains and stops their listeners.

Adding a mapping binds every port of its range before any of them starts, so a
port in use fails the whole mapping with one clear error and nothing half-started;
the mappings already running are not touched.

Ports are exclusive. No socket here sets SO_REUSEPORT, so a port another process
holds is refused ("port is already in use") and no other process can join a port
portproxy holds. A mapping whose traffic has moved elsewhere (the kernel path) is
*held* rather than closed: still bound, not serving, and unbindable by anyone else
(see :mod:`.listener`), so moving it back can never find the port taken.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import cast

from ..errors import Conflict
from ..spec import Part, format_endpoint
from .listener import Listener
from .options import ProxyOptions
from .poller import Poller
from .splice import PipePool
from .stats import TcpStats, UdpStats
from .tcp import TcpListener
from .udp import UdpListener

log = logging.getLogger("portproxy.proxy")


class ProxyError(Conflict):
    """A mapping could not be started; the message is one readable line."""


def _port_error(where: str, exc: OSError) -> ProxyError:
    if exc.errno == errno.EADDRINUSE:
        return ProxyError(f"cannot listen on {where}: port is already in use")
    if exc.errno == errno.EACCES:
        return ProxyError(f"cannot listen on {where}: permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)")
    return ProxyError(f"cannot listen on {where}: {exc.strerror or exc}")


def _where(mapping: Part, port: int) -> str:
    return f"{format_endpoint(mapping.listen_ip(), port)}/{mapping.proto}"


def bind_socket(mapping: Part, port: int, backlog: int) -> socket.socket:
    """Create and bind (and for TCP, listen on) the host side of one port of a mapping.

    Never SO_REUSEPORT: that would let any process of the same user (root) join the
    port and take a share of its connections. TCP sets SO_REUSEADDR, which only steps
    over TIME_WAIT leftovers: a listening socket still refuses every other bind."""
    ip = mapping.listen_ip()
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    kind = socket.SOCK_STREAM if mapping.proto == "tcp" else socket.SOCK_DGRAM
    where = _where(mapping, port)
    try:
        sock = socket.socket(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    except OSError as exc:
        raise _port_error(where, exc) from None
    try:
        if mapping.proto == "tcp":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # IPv6 only, as docker-proxy's [::] listener: IPv4 has a socket of its own.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if mapping.host_ip is not None and not mapping.host_ip.is_unspecified:
            # Like docker-proxy, allow binding an address that is not (yet) configured.
            sock.setsockopt(socket.SOL_IP, getattr(socket, "IP_FREEBIND", 15), 1)
        sock.bind((str(ip), port))
        if mapping.proto == "tcp":
            # Listening at once, even for a mapping that starts held: only a socket that
            # has listened is guarded against binds by its SO_REUSEADDR alone (the port's
            # bind bucket stops taking the fast path for it).
            sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise _port_error(where, exc) from None
    return sock


def listener_name(mapping: Part, host_port: int, target_port: int) -> str:
    return (
        f"{mapping.proto} {format_endpoint(mapping.listen_ip(), host_port)} -> "
        f"{format_endpoint(mapping.target_ip, target_port)}"
    )


class ProxyServer:
    """All userland mappings of one process."""

    def __init__(self, loop: asyncio.AbstractEventLoop, options: ProxyOptions) -> None:
        self.loop = loop
        self.options = options
        self.poller = Poller(loop)
        self._pipe_pools: dict[tuple[int, int], PipePool] = {}
        self.listeners: dict[Part, list[Listener]] = {}
        """Every mapping this server has bound, serving or held."""
        self.stats: dict[Part, list[TcpStats | UdpStats]] = {}
        """Counters per mapping and port, kept across listener changes (a switch away and
        back reuses them) so exported counters never go backwards; see forget_stats."""
        self.retired: list[Listener] = []
        """Closed listeners whose connections are still running (after remove())."""
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

    # --- the mappings -------------------------------------------------------------------
    def __contains__(self, mapping: object) -> bool:
        return mapping in self.listeners

    @property
    def held(self) -> frozenset[Part]:
        """Mappings that keep their ports bound without serving them."""
        return frozenset(m for m, group in self.listeners.items() if not any(x.serving for x in group))

    def serving(self, mapping: Part) -> bool:
        group = self.listeners.get(mapping)
        return bool(group) and all(listener.serving for listener in group)

    def add(self, mapping: Part, sockets: dict[int, socket.socket] | None = None,
            options: ProxyOptions | None = None, serve: bool = True) -> list[Listener]:
        """Bind every port of ``mapping`` and serve them (``serve=False``: only hold them).

        All or nothing: a ProxyError (one line) leaves nothing of the mapping bound.
        ``sockets`` may supply already bound sockets by host port (socket activation,
        docker-proxy's -use-listen-fd); the other ports are bound here. ``options``
        override the server's for this mapping's listeners.
        """
        if mapping.host_ip is None:
            raise ValueError("ProxyServer.add takes one family at a time: Mapping.per_family()")
        if mapping in self.listeners:
            raise ProxyError(f"mapping {mapping} is already running")
        options = options or self.options
        given = dict(sockets or {})
        bound: list[socket.socket] = []
        try:
            for host_port, _ in mapping.port_pairs():
                sock = given.pop(host_port, None) or self.adopted.get((mapping.proto, str(mapping.listen_ip()), host_port))
                if sock is None:
                    sock = bind_socket(mapping, host_port, options.listen_backlog)
                sock.setblocking(False)
                bound.append(sock)
        except ProxyError:
            for sock in bound:
                if not self._is_adopted(sock):
                    sock.close()
            raise
        stats = self.stats.setdefault(
            mapping, [TcpStats() if mapping.proto == "tcp" else UdpStats() for _ in range(mapping.port_count)])
        listeners = [self._listener(mapping, sock, pair, port_stats, options)
                     for sock, pair, port_stats in zip(bound, mapping.port_pairs(), stats)]
        self.listeners[mapping] = listeners
        try:
            self._set_serving(mapping, serve)
        except ProxyError:
            del self.listeners[mapping]
            for listener in listeners:
                listener.close()
            raise
        return listeners

    def serve(self, mapping: Part) -> None:
        """Serve a held mapping again (idempotent); ProxyError if a port cannot listen."""
        self._set_serving(mapping, True)

    def hold(self, mapping: Part) -> None:
        """Stop serving but keep every port bound and exclusive (idempotent).

        What already waits in the accept queue is accepted and relayed first; live
        connections and UDP flows run on."""
        self._set_serving(mapping, False)

    def remove(self, mapping: Part) -> None:
        """Release a mapping's ports; its live TCP connections run to their end.

        The accept queue is emptied first, so a handshake that completed before the
        traffic moved elsewhere is relayed rather than reset. UDP flows end now.
        Removing a mapping that is not there does nothing."""
        for listener in self.listeners.pop(mapping, []):
            listener.close()
            if listener.open_connections:
                self.retired.append(listener)
        self.retired = [listener for listener in self.retired if listener.open_connections]

    def forget_stats(self, mapping: Part) -> None:
        """Drop a mapping's counters (it is gone for good: its series should disappear)."""
        self.stats.pop(mapping, None)

    def _set_serving(self, mapping: Part, serve: bool) -> None:
        group = self.listeners.get(mapping)
        if group is None:
            raise ProxyError(f"mapping {mapping} is not running")
        if not serve:
            for listener in group:
                listener.hold()
            return
        for (host_port, _), listener in zip(mapping.port_pairs(), group):
            try:
                listener.serve()
            except OSError as exc:
                for other in group:
                    other.hold()
                raise _port_error(_where(mapping, host_port), exc) from None

    def _listener(self, mapping: Part, sock: socket.socket, pair: tuple[int, int],
                  stats: TcpStats | UdpStats, options: ProxyOptions) -> Listener:
        host_port, target_port = pair
        target = (str(mapping.target_ip), target_port)
        name = listener_name(mapping, host_port, target_port)
        listener: Listener
        if mapping.proto == "tcp":
            listener = TcpListener(self.loop, sock, target, name, options, self._pipe_pool(options), self.poller,
                                   cast(TcpStats, stats))
        else:
            listener = UdpListener(self.loop, sock, target, name, options, self.poller, cast(UdpStats, stats))
        listener.owned = not self._is_adopted(sock)
        return listener

    def _is_adopted(self, sock: socket.socket) -> bool:
        return any(sock is adopted for adopted in self.adopted.values())

    def _pipe_pool(self, options: ProxyOptions) -> PipePool | None:
        """The splice pipes for listeners with these options (one pool per pipe size)."""
        if not options.splice:
            return None
        key = (options.pipe_size, options.pipe_pool_max)
        pool = self._pipe_pools.get(key)
        if pool is None:
            pool = self._pipe_pools[key] = PipePool(*key)
        return pool

    # --- stopping -----------------------------------------------------------------------
    async def stop(self, drain_timeout: float | None = None) -> None:
        """Stop every mapping (graceful: live connections get up to drain_timeout)."""
        for mapping in list(self.listeners):
            self.remove(mapping)
        listeners, self.retired = self.retired, []
        timeout = self.options.drain_timeout if drain_timeout is None else drain_timeout
        deadline = self.loop.time() + timeout
        while any(listener.open_connections for listener in listeners) and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        left = sum(listener.open_connections for listener in listeners)
        if left:
            log.info("drain timeout: closing %d connection(s) still open", left)
        for listener in listeners:
            listener.abort()
        for pool in self._pipe_pools.values():
            pool.close()
        self.poller.close()

    def connection_count(self) -> int:
        live = [listener for group in self.listeners.values() for listener in group]
        return sum(listener.open_connections for listener in live + self.retired)
