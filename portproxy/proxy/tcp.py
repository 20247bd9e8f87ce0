"""TCP: accept on a raw listening socket, connect to the target, relay both ways.

Life of a connection (:class:`TcpRelay`):

1. accepted by :class:`TcpListener` (an adaptive batch of ``accept()`` per readiness
   event);
2. a non-blocking connect to the target, bounded by ``connect_timeout``; on failure
   the client is reset at once and counted, and the log gets the first failure of a
   mapping at once and a summary of the next ones at most every few seconds
   (:mod:`.throttle`). A client that resets while the connect is pending cancels it:
   its socket is watched for a hang-up meanwhile;
3. two pumps relay the directions, the client's first bytes read at once (they have
   usually arrived by then). EOF on one side becomes ``shutdown(SHUT_WR)`` on
   the other while the opposite direction goes on (docker-proxy's CloseRead /
   CloseWrite); an error on either side resets both.

Sockets stay raw (no transports) because splice needs their fds and an fd owned by
a transport must not be given to ``add_reader`` (uvloop crashes on it).
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import functools
import logging
import os
import socket
import struct
import time
from typing import TYPE_CHECKING

from .copy import CopyPump
from .listener import Listener
from .poller import Poller
from .proxy_protocol import header_for
from .pump import Pump
from .source import ClientSource
from .splice import PipePool, SplicePump
from .stats import TO_CLIENT, TO_TARGET, TcpStats
from .throttle import LogThrottle, summary_text

if TYPE_CHECKING:
    from .options import ProxyOptions

log = logging.getLogger("portproxy.tcp")

_LINGER_RESET = struct.pack("ii", 1, 0)
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_ACCEPT_BATCH = 64
_GROW_AFTER = 4
_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 1.0
_FIRST_BYTES = 4096
"""Client bytes that may go out with a PROXY header (see TcpRelay._send_proxy_header)."""


_Socket = _socket.socket
"""The relay's sockets are the C socket type, not socket.socket: the same methods without
its Python ``__init__`` and ``close`` wrappers (frames per connection; the relay never
uses makefile(), which is what the wrappers are for) and with no enum conversions."""
_close = _Socket.close

_PROVEN = 1 << 20
"""Bytes a client must have acknowledged before the target's socket gets a full-size buffer."""
_TCPI_BYTES_ACKED = struct.Struct("=Q")
_TCPI_BYTES_ACKED_OFFSET = 120
"""Offset of tcpi_bytes_acked in struct tcp_info (Linux >= 4.1)."""


@functools.cache
def _rcvbuf_max() -> int:
    """The receive buffer autotuning may grow to (tcp_rmem's maximum; SO_RCVBUF doubles
    what it is given, and caps it at net.core.rmem_max)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_rmem") as f:
            return int(f.read().split()[2]) // 2
    except (OSError, ValueError, IndexError):
        return 3 << 20


def _bytes_acked(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_BYTES_ACKED_OFFSET + 8)
    if len(info) < _TCPI_BYTES_ACKED_OFFSET + 8:
        return 0
    return int(_TCPI_BYTES_ACKED.unpack_from(info, _TCPI_BYTES_ACKED_OFFSET)[0])


def _connected(sock: socket.socket) -> bool:
    """Did a non-blocking connect that said EINPROGRESS complete already?

    To a target on a local bridge it usually has: the SYN, the SYN-ACK and the ACK are
    processed within the connect() call itself. Asking costs one getpeername(); waiting
    for writability would cost a poll handle's set-up and teardown and a loop turn."""
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


class TcpRelay:
    """One client connection and its upstream connection to the target."""

    __slots__ = ("_listener", "_loop", "_poller", "client", "upstream", "_pumps", "_timer", "_t0", "_closed")

    def __init__(self, listener: "TcpListener", client: socket.socket) -> None:
        self._listener = listener
        self._loop = listener.loop
        self._poller = listener.poller
        self.client = client
        self.upstream: socket.socket | None = None
        self._pumps: tuple[Pump, Pump] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._t0 = 0.0
        self._closed = False

    # --- connecting ---------------------------------------------------------
    def connect(self) -> None:
        listener = self._listener
        try:
            up = _Socket(listener.target_family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        except OSError as exc:
            self._no_upstream_socket(exc)
            return
        self.upstream = up
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if listener.target_cc is not None:
            try:
                up.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, listener.target_cc)
            except OSError:
                pass  # checked at start; if the module went away since, the default still relays
        if listener.source is not None:  # transparent mode: leave from the client's address
            self._bind_to_client(up)
        self._t0 = time.monotonic()
        err = up.connect_ex(listener.target)
        if err == errno.EINPROGRESS:  # _connected(), inline: once per connection
            try:
                up.getpeername()
                err = 0
            except OSError:
                pass
        if err == 0:
            self._established()
        elif err == errno.EINPROGRESS:
            self._poller.add_writer(up.fileno(), self._on_connect_done)
            self._poller.add_hangup(self.client.fileno(), self._on_client_gone)
            self._timer = self._loop.call_later(listener.options.connect_timeout, self._on_connect_timeout)
        else:
            self._connect_failed(os.strerror(err), errno.errorcode.get(err, str(err)))

    def _bind_to_client(self, up: socket.socket) -> None:
        try:
            peer = self.client.getpeername()
        except OSError:
            return  # the client is gone already; its pump will see it
        assert self._listener.source is not None
        self._listener.source.bind(up, peer)

    def _send_proxy_header(self, up: socket.socket) -> bool:
        """The PROXY header in one send, before any payload; anything short of that resets both.

        Client bytes already queued (an HTTP request usually is by now) ride in the same
        send, behind the header: one segment instead of two, so the target parses header
        and request in one read. At most _FIRST_BYTES, which a fresh socket's send buffer
        always takes whole; nothing is waited for (a server-first protocol gets its header
        at once)."""
        listener = self._listener
        assert listener.proxy_protocol is not None
        try:
            header = header_for(listener.proxy_protocol, self.client)
            try:
                first = self.client.recv(_FIRST_BYTES, socket.MSG_DONTWAIT)
            except BlockingIOError:
                first = b""  # (EOF also reads b"" and is read again by the pump: it sticks)
            data = header + first
            sent = up.send(data)
        except (OSError, ValueError) as exc:
            why = str(exc)
        else:
            if sent == len(data):
                listener.stats.bytes[TO_TARGET] += len(first)
                return True
            why = f"sent {sent} of {len(data)} bytes"
        listener.stats.connect_failures["proxy_header"] += 1
        listener.warn_failure(f"PROXY header to {listener.target_text} failed: {why}", "proxy_header")
        self.close(reset=True)
        return False

    def _on_connect_done(self) -> None:
        up = self.upstream
        assert up is not None
        err = up.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not err and not _connected(up):
            return  # a stale wake-up (the fd number was reused within one batch): wait on
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._poller.remove_writer(up.fileno())
        if err:
            self._connect_failed(os.strerror(err), errno.errorcode.get(err, str(err)))
        else:
            self._established()

    def _on_connect_timeout(self) -> None:
        self._timer = None
        up = self.upstream
        assert up is not None
        self._poller.remove_writer(up.fileno())
        self._connect_failed(f"no answer within {self._listener.options.connect_timeout:g}s", "timeout")

    def _on_client_gone(self) -> None:
        """The client reset (or vanished) while the connect is pending: give up on it now,
        rather than hold both fds and an "active" connection for the connect timeout."""
        self._listener.stats.connect_failures["client_gone"] += 1
        self.close(reset=True)

    def _connect_failed(self, why: str, reason: str) -> None:
        listener = self._listener
        listener.stats.connect_failures[reason] += 1
        listener.warn_failure(f"connect to {listener.target_text} failed: {why}", reason)
        self.close(reset=True)

    def _no_upstream_socket(self, exc: OSError) -> None:
        """No socket for the target (out of fds or memory, typically): reset the client
        now, or it would sit in CLOSE-WAIT for ever and count as a live connection."""
        listener = self._listener
        reason = errno.errorcode.get(exc.errno or 0, "other")
        listener.stats.connect_failures[reason] += 1
        if exc.errno in _RESOURCE_ERRNOS:
            listener.pause_for_resources(f"cannot open a socket to the target ({exc.strerror})")
        else:
            listener.warn_failure(f"connect to {listener.target_text} failed: {exc.strerror}", reason)
        self.close(reset=True)

    def _established(self) -> None:
        listener = self._listener
        stats = listener.stats
        stats.record_connect(time.monotonic() - self._t0)
        up = self.upstream
        assert up is not None
        if listener.proxy_protocol is not None and not self._send_proxy_header(up):
            return
        # The client's TCP_NODELAY and TCP_NOTSENT_LOWAT came with accept(): see _tune.
        totals = stats.bytes
        poller = self._poller
        pool = listener.pipe_pool
        if pool is not None:
            to_target: Pump = SplicePump(poller, self.client, up, self, totals, TO_TARGET, pool=pool)
            to_client: Pump = SplicePump(poller, up, self.client, self, totals, TO_CLIENT, pool=pool)
        else:
            to_target = CopyPump(poller, self.client, up, self, totals, TO_TARGET)
            to_client = CopyPump(poller, up, self.client, self, totals, TO_CLIENT)
        self._pumps = (to_target, to_client)
        if listener.target_rcvbuf:
            # A small buffer until the client shows it reads; see pump_read. Set after
            # connect(): the window scale was agreed for the full buffer it may get later.
            # Not lazily at the first read: by then the window advertised for the default
            # buffer may have let ~100 KB in.
            up.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, listener.target_rcvbuf)
            to_client.watched = True
        to_client.start()
        to_target.start()
        poller.remove_hangup(self.client.fileno())  # its reader took over: no syscall
        if listener.proxy_protocol is None:  # (that path has read the first bytes already)
            # The client's first bytes have usually arrived while the target was being
            # connected (a client speaks right after its handshake): forwarding them now
            # spares the wake-up that would report them. Last, as it may close the relay.
            to_target.read_now()

    # --- pump owner ---------------------------------------------------------
    def pump_done(self, pump: Pump) -> None:
        """src of ``pump`` sent EOF and all its bytes were forwarded: half-close dst,
        or, when the other direction is finished too, close both (which sends the FIN)."""
        pumps = self._pumps
        assert pumps is not None
        if pumps[0].done and pumps[1].done:
            self.close()
            return
        try:
            pump.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer is gone already; its own pump will notice

    def pump_read(self, pump: Pump) -> None:
        """The target's bytes were read, before the client has proved that it reads.

        What the target sends waits in the target socket's receive queue, and receive
        buffer autotuning grows that buffer as fast as the proxy reads, whether or not
        the client takes anything: a client that never read let it grow to ~4 MB in the
        first round trips and pin them for as long as it liked. So the buffer starts
        small (``target_rcvbuf``) and, once the client has acknowledged its first
        ``_PROVEN`` bytes, becomes as large as autotuning could make it: a reader gets
        the throughput it always had, and memory is only used while bytes wait."""
        up = self.upstream
        assert up is not None
        try:
            if pump.moved < _PROVEN or _bytes_acked(self.client) < _PROVEN:
                return  # (the client cannot have acknowledged more than was read for it)
            pump.watched = False
            up.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _rcvbuf_max())
        except OSError:
            pass  # the connection is going away; its pumps will say so

    def pump_failed(self, pump: Pump, exc: OSError) -> None:
        log.debug("%s: connection reset: %s", self._listener.name, exc)
        self.close(reset=True)

    # --- teardown -----------------------------------------------------------
    def close(self, reset: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        forget = self._poller.forget
        pumps = self._pumps
        if pumps is not None:
            for pump in pumps:
                pump.abandon()  # its fds are forgotten below: no poller calls
        for sock in (self.client, self.upstream):
            if sock is not None:
                forget(sock.fileno())  # closing takes the fds out of the epoll set
                if reset:
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                    except OSError:
                        pass
                _close(sock)
        self._listener.connection_closed(self)


class TcpListener(Listener):
    """Accepts on one host port and relays each connection to one target address."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        target: tuple,
        name: str,
        options: "ProxyOptions",
        pipe_pool: PipePool | None,
        poller: Poller,
        stats: TcpStats | None = None,
    ) -> None:
        self.loop = loop
        self.poller = poller
        """Readiness of the relayed sockets (the listening socket stays with the loop)."""
        self.sock = sock
        self.target = target
        self.target_family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
        self.target_text = f"[{target[0]}]:{target[1]}" if ":" in target[0] else f"{target[0]}:{target[1]}"
        self.name = name
        self.options = options
        self.target_cc = options.target_cc.encode() if options.target_cc else None
        self.target_rcvbuf = options.target_rcvbuf
        self.notsent_lowat = options.notsent_lowat
        self.pipe_pool = pipe_pool
        self.stats: TcpStats = stats if stats is not None else TcpStats()
        self.proxy_protocol = options.proxy_protocol
        self.source = ClientSource(target[0], name, self.stats.source_fallbacks) \
            if options.source == "client" else None
        self.connections: set[TcpRelay] = set()
        self._accepting = False
        self._closed = False
        self._backoff = 0.0
        self._backoff_timer: asyncio.TimerHandle | None = None
        self._resource_warned = False
        self._family = sock.family.value
        self._batch = 1
        self._used_up = 0
        self._failure_log = LogThrottle()
        self._failure_log_timer: asyncio.TimerHandle | None = None
        self.owned = True

    # --- Listener -----------------------------------------------------------------------
    @property
    def serving(self) -> bool:
        return self._accepting

    @property
    def open_connections(self) -> int:
        return len(self.connections)

    def serve(self) -> None:
        if self._accepting:
            return
        self._tune()
        self._listen()
        self._accepting = True
        self.loop.add_reader(self.sock.fileno(), self._on_acceptable)

    def hold(self) -> None:
        """Relay the accept queue, then stop listening but stay bound.

        On Linux shutdown(SHUT_RD) takes a listening socket back to CLOSE without
        releasing its port (bind() locked it); with SO_REUSEADDR cleared no other socket
        can bind the port, however it asks. listen() brings it back (:meth:`serve`)."""
        self.accept_pending()
        self._stop_accepting()
        if self._listening():
            try:
                self.sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass  # not connected/listening any more: nothing queued to refuse
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)

    def close(self) -> None:
        if self._closed:
            return
        self.accept_pending()
        self._stop_accepting()
        self._closed = True
        self._summarise_failures()
        self._arm_failure_log()  # connects still pending may fail after this
        if self.owned:
            self.sock.close()
        else:
            self._listen()  # give a supervisor's socket back the way it came: listening

    def abort(self) -> None:
        for relay in list(self.connections):
            relay.close(reset=True)

    # --- socket states ------------------------------------------------------------------
    def _listening(self) -> bool:
        return bool(self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))

    def _tune(self) -> None:
        """Options every client socket needs, set once on the listening socket: an
        accepted socket inherits TCP_NODELAY and TCP_NOTSENT_LOWAT from its listener,
        which spares two setsockopt calls per connection."""
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.notsent_lowat:
            self.sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, self.notsent_lowat)

    def _listen(self) -> None:
        if not self._listening():
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.listen(self.options.listen_backlog)

    def _stop_accepting(self) -> None:
        """Stop taking new connections; the ones already accepted go on."""
        if self._backoff_timer is not None:
            self._backoff_timer.cancel()
            self._backoff_timer = None
        if self._accepting:
            self._accepting = False
            self.loop.remove_reader(self.sock.fileno())

    def accept_pending(self) -> None:
        """Accept and relay every connection already waiting in the accept queue."""
        if self._accepting:
            self._on_acceptable(batch=1 << 30)

    def connection_closed(self, relay: TcpRelay) -> None:
        self.connections.discard(relay)
        self.stats.active -= 1

    def _on_acceptable(self, batch: int = 0) -> None:
        """Accept up to ``batch`` connections (0: the adaptive batch).

        Every accept that finds the queue empty costs a syscall and a Python exception,
        so the batch adapts: after _GROW_AFTER wake-ups in a row that used it up (the
        loop calls again while the listener stays readable) it doubles, up to
        _ACCEPT_BATCH, and it falls back to what was there when an accept found the
        queue empty. Connections that come one at a time cost about one accept each;
        a burst is taken many per wake-up."""
        sock = self.sock
        stats = self.stats
        accept = sock._accept  # (fd, address): no Python-level wrapper, no enum conversions
        family = self._family
        adaptive = not batch
        if adaptive:
            batch = self._batch
        accepted = 0
        while accepted < batch:
            try:
                fd, _addr = accept()
            except BlockingIOError:
                if adaptive:
                    self._batch = max(1, accepted)
                    self._used_up = 0
                break
            except ConnectionAbortedError:
                accepted += 1
                continue
            except OSError as exc:
                stats.accept_errors[errno.errorcode.get(exc.errno or 0, "other")] += 1
                if exc.errno in _RESOURCE_ERRNOS:
                    self.pause_for_resources(f"accept failed ({exc.strerror})")
                    return
                log.warning("%s: accept failed: %s", self.name, exc)
                break
            accepted += 1
            client = _Socket(family, socket.SOCK_STREAM, 0, fd)
            client.setblocking(False)
            stats.accepted += 1
            stats.active += 1
            relay = TcpRelay(self, client)
            self.connections.add(relay)
            relay.connect()
            if self._backoff_timer is not None:
                return  # that connect ran out of resources: the next accept would too
        else:
            if adaptive:
                self._used_up += 1
                if self._used_up >= _GROW_AFTER:
                    self._batch = min(_ACCEPT_BATCH, batch * 2)
        if self._backoff:
            self._backoff = 0.0
            if self._resource_warned:
                log.warning("%s: accepting again", self.name)
                self._resource_warned = False

    # --- failure log -------------------------------------------------------------------
    def warn_failure(self, text: str, reason: str) -> None:
        """One connection could not reach the target (already counted by the caller):
        the first of a window is logged now, the others in the window's summary."""
        throttle = self._failure_log
        if throttle.admit(self.loop.time(), reason):
            log.warning("%s: %s", self.name, text)
            self._arm_failure_log()

    def _arm_failure_log(self) -> None:
        due = self._failure_log.due
        if due is not None and self._failure_log_timer is None:
            self._failure_log_timer = self.loop.call_at(due, self._failure_log_due)

    def _failure_log_due(self) -> None:
        self._failure_log_timer = None
        self._summarise_failures()
        self._arm_failure_log()

    def _summarise_failures(self) -> None:
        """Write what the window held back (now: at its end, or when the listener closes)."""
        if self._failure_log_timer is not None:
            self._failure_log_timer.cancel()
            self._failure_log_timer = None
        throttle = self._failure_log
        if throttle.due is None:
            return
        now = self.loop.time()
        since = throttle.due - throttle.interval
        held = throttle.summary(now)
        if held:
            log.warning("%s: connect to %s failed: %s", self.name, self.target_text, summary_text(held, now - since))

    def pause_for_resources(self, why: str) -> None:
        """Out of fds or memory (on accept, or on the target's socket): stop polling the
        listener for a while instead of spinning; one log line until it recovers."""
        if not self._resource_warned:
            log.warning("%s: %s; backing off until resources free up", self.name, why)
            self._resource_warned = True
        if self._backoff_timer is not None:
            return
        self._backoff = min(_BACKOFF_MAX, self._backoff * 2 or _BACKOFF_FIRST)
        self.loop.remove_reader(self.sock.fileno())
        self._backoff_timer = self.loop.call_later(self._backoff, self._resume)

    def _resume(self) -> None:
        self._backoff_timer = None
        if self._accepting:
            self.loop.add_reader(self.sock.fileno(), self._on_acceptable)
