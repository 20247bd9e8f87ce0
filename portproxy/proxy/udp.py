"""UDP: a bounded flow table keyed by client address, one connected backend socket per flow.

Each client address gets its own socket connected to the target, so the target
sees one stable source port per client (as with docker-proxy) and its replies
come back on a socket that already knows whom they belong to. Replies leave the
listening socket *from the address the client sent to*: on a wildcard listener
that address is taken from IP_PKTINFO / IPV6_PKTINFO, otherwise a multi-homed
host would answer from whatever address its routing table picks.

The flows live in a :class:`~.flowtable.FlowTable` (idle expiry after ``udp_timeout``,
eviction of the least recently active flow past ``max_udp_flows``). Datagrams already
queued when a socket is read go on in GSO runs gathered by a :class:`~.gso.Batcher`,
in both directions: to the target on the flow's socket, back to the client on the
listening socket. Both are plain objects, tested without sockets; this module does the
I/O. The flows' sockets sit on the proxy's :class:`~.poller.Poller`, like the TCP
relays', so a flow costs no event-loop handle of its own; and not on uvloop directly for
a second reason: libuv stops polling a socket that reports an error (EPOLLERR), which
is what an ICMP port unreachable from the target is, and the flow's replies would never
be read again.

Work per datagram is what limits this path, so each wakeup drains its socket (bounded)
and the kernel is asked to do per burst what it would do per datagram: UDP_GRO on the
listening and the flow sockets hands over a run of one sender's datagrams in one receive
(the segment size in a cmsg), and the run leaves as one UDP_SEGMENT send. Runs arrive
that way from senders that use GSO themselves (QUIC stacks: their runs reach a UDP_GRO
socket whole) and from devices that do GRO under load (a physical NIC); a veth hands
over every datagram alone.

Gathering a run costs the first datagram of a wakeup a receive that finds nothing before
it is sent. Where the last wakeup found a lone datagram (request and response), the first
one goes at once and the rest of a burst is gathered as usual, so a round trip waits for
no empty receive in either direction.

Receive buffers are sized for a burst (SO_RCVBUFFORCE where the process may, else
SO_RCVBUF up to ``net.core.rmem_max``). An adopted socket is left as its owner configured
it: another reader of it would not expect coalesced datagrams.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import TYPE_CHECKING

from .flowtable import FlowTable
from .gso import Batcher, segments
from .listener import Listener
from .poller import Poller
from .source import ClientSource
from .stats import UdpStats
from .udpcmsg import IP_PKTINFO, RECV_SPACE, SOL_UDP, UDP_GRO, gro_size, reply_cmsg, segment_cmsg

if TYPE_CHECKING:
    from .options import ProxyOptions

log = logging.getLogger("portproxy.udp")

IP_MTU = getattr(socket, "IP_MTU", 14)
IPV6_MTU = getattr(socket, "IPV6_MTU", 24)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_GSO_UNSUPPORTED = {errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP}
_GSO_TOO_WIDE = errno.EMSGSIZE
"""A GSO send whose segments do not fit the route's MTU (the path MTU shrank, or the
route to a client is narrower): the datagrams go one by one, fragmented if need be."""
_BATCH = 64
"""Receives per wakeup and socket: a burst is drained, one busy socket cannot starve the rest."""
LISTENER_RCVBUF = 4 << 20
"""Receive buffer of a listening socket: ~30 ms of 1 Gbit/s, the stalls of a shared CPU."""
FLOW_RCVBUF = 1 << 20
"""Receive buffer of a flow's socket (replies): a burst, without 4,096 flows pinning gigabytes."""
MAX_REPLY_SEGMENT = 65507
"""A reply run's segment size is limited per flow by what the route to the client takes;
until a send says otherwise, anything a datagram can be."""


def _set_rcvbuf(sock: socket.socket, size: int) -> None:
    """SO_RCVBUFFORCE (CAP_NET_ADMIN) past net.core.rmem_max, else SO_RCVBUF up to it."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except OSError:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        except OSError:
            pass


def _enable_gro(sock: socket.socket) -> bool:
    """UDP_GRO: a receive may hand over a run of datagrams (kernel 5.0 and later)."""
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


class UdpFlow:
    __slots__ = ("listener", "client", "sock", "fd", "reply_cmsg", "last", "gso_max", "reply_gso_max", "gro", "lone")

    def __init__(self, listener: "UdpListener", client: tuple, sock: socket.socket, reply_cmsg: list) -> None:
        self.listener = listener
        self.client = client
        self.sock = sock
        self.fd = sock.fileno()
        self.reply_cmsg = reply_cmsg
        self.last = 0.0
        self.gso_max = _gso_segment_limit(sock)
        """Largest datagram that may go in a GSO batch: a segment must not need IP
        fragmentation, so it fits the route's MTU (0: never batch)."""
        self.reply_gso_max = MAX_REPLY_SEGMENT
        """The same towards the client, learnt from the kernel's refusals (the listening
        socket is not connected: it has no route MTU to ask)."""
        _set_rcvbuf(sock, FLOW_RCVBUF)
        self.gro: bool | None = None
        """UDP_GRO on this socket: None until a wakeup finds more than one datagram (a
        request/response flow reads without cmsgs), then whether the kernel took it."""
        self.lone = True
        """The last wakeup found one datagram: send the next one at once (see the module's
        docstring)."""

    def on_readable(self) -> None:
        """Datagrams from the target: back to the client, runs of equal size as one GSO send."""
        listener = self.listener
        sock = self.sock
        batcher = _TO_CLIENT
        gro = self.gro
        eager = self.lone
        got = 0
        try:
            for _ in range(_BATCH):
                size = 0
                try:
                    if gro:
                        n, ancdata, _flags, _addr = sock.recvmsg_into([batcher.slot()], RECV_SPACE)
                        if ancdata:
                            size = gro_size(ancdata)
                    else:
                        n = sock.recv_into(batcher.slot())
                except BlockingIOError:
                    break
                except OSError as exc:
                    # Typically ICMP port unreachable from the target (ECONNREFUSED): reading
                    # it cleared it and the flow lives on.
                    if not isinstance(exc, ConnectionRefusedError):
                        listener.stats.send_errors[errno.errorcode.get(exc.errno or 0, "other")] += 1
                    continue
                got += 1
                if eager:
                    eager = False
                    if not size:  # nothing is gathered yet: the datagram is at the slot's start
                        listener._reply(self, batcher.slot()[:n], n, 1)
                        continue
                batcher.add(self, n, listener._gso and (size or n) <= self.reply_gso_max, size)
        finally:
            batcher.flush()
        self.lone = got <= 1
        if got > 1 and gro is None:
            self.gro = _enable_gro(sock)
        if got:
            listener.flows.touch(self.client, listener.loop.time())

    def close(self) -> None:
        self.listener.poller.forget(self.fd)  # closing takes the fd out of the epoll set
        self.sock.close()


def _gso_segment_limit(sock: socket.socket) -> int:
    """Payload bytes per datagram that fit the connected route's MTU unfragmented."""
    try:
        if sock.family == socket.AF_INET6:
            return int(sock.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU)) - 48
        return int(sock.getsockopt(socket.IPPROTO_IP, IP_MTU)) - 28
    except OSError:
        return 0


class UdpListener(Listener):
    """Relays datagrams on one host port to one target address."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        target: tuple,
        name: str,
        options: "ProxyOptions",
        poller: Poller,
        stats: UdpStats | None = None,
    ) -> None:
        self.loop = loop
        self.poller = poller
        """Readiness of the flows' sockets (the listening socket stays with the loop)."""
        self.sock = sock
        self.target = target
        self.target_family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
        self.name = name
        self.options = options
        self.stats: UdpStats = stats if stats is not None else UdpStats()
        self.source = ClientSource(target[0], name, self.stats.source_fallbacks) \
            if options.source == "client" else None
        """Transparent mode: each flow socket is bound to its client's address and port."""
        self.flows: FlowTable[UdpFlow] = FlowTable(options.max_udp_flows, options.udp_timeout)
        self._pktinfo = _is_wildcard(sock)
        if self._pktinfo:
            if sock.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        self._sweeper: asyncio.TimerHandle | None = None
        self._gso = True
        """Batch runs of equal-sized datagrams with UDP_SEGMENT until the kernel refuses it."""
        self._gro: bool | None = False
        """UDP_GRO on the listening socket: False for an adopted one, None until a wakeup
        finds more than one datagram, then whether the kernel took it."""
        self._cmsgs = self._pktinfo
        """Read with recvmsg, for PKTINFO or UDP_GRO's cmsg."""
        self._tuned = False
        self._lone = True
        """The last wakeup found one datagram: send the next one at once (see the module's
        docstring)."""
        self._reading = False
        self._was_held = False
        self.owned = True

    # --- Listener -----------------------------------------------------------------------
    @property
    def serving(self) -> bool:
        return self._reading

    @property
    def open_connections(self) -> int:
        return 0  # flows end with the listener: nothing to wait for

    def serve(self) -> None:
        if self._reading:
            return
        if self._was_held:
            self._discard_queued()
        if not self._tuned and self.owned:
            self._tuned = True
            _set_rcvbuf(self.sock, LISTENER_RCVBUF)
            self._gro = None
        self._reading = True
        self.loop.add_reader(self.sock.fileno(), self._on_readable)
        if self._sweeper is None:
            self._schedule_sweep()

    def hold(self) -> None:
        """Stop reading; the socket stays bound (without SO_REUSEADDR or SO_REUSEPORT no
        one else can bind the port) and existing flows relay replies until they expire."""
        self._was_held = True
        if self._reading:
            self._on_readable()  # what is queued already was sent to this listener
            self._reading = False
            self.loop.remove_reader(self.sock.fileno())
        if self._sweeper is None:
            self._schedule_sweep()

    def close(self) -> None:
        if self._reading:
            self._reading = False
            self.loop.remove_reader(self.sock.fileno())
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for flow in self.flows.clear():
            flow.close()
            self.stats.flows_active -= 1
        if self.owned:
            self.sock.close()

    def abort(self) -> None:
        pass  # close() ended the flows already

    def _discard_queued(self) -> None:
        """Datagrams that arrived while held were not served; answering them now, maybe
        minutes late, would only confuse their senders."""
        for _ in range(1 << 16):
            try:
                self.sock.recv(1)
            except BlockingIOError:
                return
            except OSError:
                continue

    # --- client → target ----------------------------------------------------
    def _on_readable(self) -> None:
        """Read what is queued; send it on per flow, equal-sized runs as one GSO batch."""
        sock = self.sock
        stats = self.stats
        flows = self.flows
        lookup = flows.get
        batcher = _TO_TARGET
        now = self.loop.time()
        cmsgs = self._cmsgs
        gso = self._gso
        eager = self._lone
        got = 0
        try:
            for _ in range(_BATCH):
                size = 0
                try:
                    if cmsgs:
                        n, ancdata, _flags, client = sock.recvmsg_into([batcher.slot()], RECV_SPACE)
                        # (PKTINFO alone is the common case: look no further then.)
                        if ancdata and (ancdata[0][0] == SOL_UDP or len(ancdata) > 1):
                            size = gro_size(ancdata)
                    else:
                        n, client = sock.recvfrom_into(batcher.slot())
                        ancdata = []
                except BlockingIOError:
                    break
                except OSError as exc:
                    stats.send_errors[errno.errorcode.get(exc.errno or 0, "other")] += 1
                    continue
                stats.datagrams_to_target += segments(n, size) if size else 1
                stats.bytes_to_target += n
                flow = lookup(client)
                if flow is None:
                    batcher.cut(n)  # the run so far goes first: opening a flow may evict its flow
                    flow = self._open_flow(client, ancdata, now)
                    if flow is None:
                        continue
                elif flow is not batcher.flow:
                    flows.touch(client, now)  # (a run's later datagrams share its first one's time)
                got += 1
                if eager:
                    eager = False
                    if not size:  # nothing is gathered yet: the datagram is at the slot's start
                        self._send(flow, batcher.slot()[:n], n, 1)
                        continue
                batcher.add(flow, n, gso and (size or n) <= flow.gso_max, size)
        finally:
            batcher.flush()
        self._lone = got <= 1
        if got > 1 and self._gro is None:
            self._gro = _enable_gro(sock)
            self._cmsgs = self._pktinfo or self._gro

    def _send(self, flow: UdpFlow, data: memoryview, size: int, count: int) -> None:
        """Send ``count`` datagrams of ``size`` bytes (the last may be shorter) to the target:
        one send() for a lone datagram, one GSO sendmsg() for a run of them."""
        sock = flow.sock
        segment = [segment_cmsg(size)] if count > 1 else None
        for attempt in (1, 2):
            try:
                if segment is None:
                    sock.send(data)
                else:
                    sock.sendmsg([data], segment)
                return
            except ConnectionRefusedError:
                # An earlier datagram drew ICMP port unreachable; reporting it cleared it.
                if attempt == 2:
                    self.stats.send_errors["ECONNREFUSED"] += count
            except OSError as exc:
                if segment is None or (exc.errno not in _GSO_UNSUPPORTED and exc.errno != _GSO_TOO_WIDE):
                    self.stats.send_errors[errno.errorcode.get(exc.errno or 0, "other")] += count
                    return
                if exc.errno == _GSO_TOO_WIDE:
                    flow.gso_max = min(flow.gso_max, size - 1)
                else:
                    log.info("%s: no UDP GSO here (%s); sending one datagram per call", self.name, exc.strerror)
                    self._gso = False
                for offset in range(0, len(data), size):
                    self._send(flow, data[offset:offset + size], size, 1)
                return

    def _open_flow(self, client: tuple, ancdata: list, now: float) -> UdpFlow | None:
        stats = self.stats
        oldest = self.flows.evict_if_full()
        if oldest is not None:
            oldest.close()
            stats.flows_evicted += 1
            stats.flows_active -= 1
        try:
            up = socket.socket(self.target_family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        except OSError as exc:
            stats.send_errors[errno.errorcode.get(exc.errno or 0, "other")] += 1
            log.warning("%s: cannot open a flow for %s: %s", self.name, client[0], exc.strerror)
            return None
        if self.source is not None:
            self.source.bind(up, client)
        try:
            up.connect(self.target)
        except OSError as exc:
            up.close()
            stats.send_errors[errno.errorcode.get(exc.errno or 0, "other")] += 1
            log.warning("%s: cannot reach target %s: %s", self.name, self.target[0], exc.strerror)
            return None
        flow = UdpFlow(self, client, up, reply_cmsg(ancdata))
        self.flows.add(client, flow, now)
        self.poller.add_reader(flow.fd, flow.on_readable)
        stats.flows_created += 1
        stats.flows_active += 1
        return flow

    # --- target → client ----------------------------------------------------
    def _reply(self, flow: UdpFlow, data: memoryview, size: int, count: int) -> None:
        """Send ``count`` datagrams of ``size`` bytes (the last may be shorter) to the
        client, from the address it sent to: one sendto() or sendmsg() per run."""
        stats = self.stats
        cmsg = flow.reply_cmsg
        if count > 1:
            cmsg = [*cmsg, segment_cmsg(size)]
        try:
            if cmsg:
                self.sock.sendmsg([data], cmsg, 0, flow.client)
            else:
                self.sock.sendto(data, flow.client)
        except OSError as exc:
            if count > 1 and (exc.errno in _GSO_UNSUPPORTED or exc.errno == _GSO_TOO_WIDE):
                if exc.errno in (_GSO_TOO_WIDE, errno.EINVAL):
                    # A segment wider than the route to this client takes (older kernels
                    # say EINVAL).
                    flow.reply_gso_max = min(flow.reply_gso_max, size - 1)
                else:
                    log.info("%s: no UDP GSO here (%s); sending one datagram per call", self.name, exc.strerror)
                    self._gso = False
                for offset in range(0, len(data), size):
                    self._reply(flow, data[offset:offset + size], size, 1)
                return
            stats.send_errors[errno.errorcode.get(exc.errno or 0, "other")] += count
            return
        stats.datagrams_to_client += count
        stats.bytes_to_client += len(data)

    # --- expiry -------------------------------------------------------------
    def _schedule_sweep(self) -> None:
        interval = min(1.0, max(0.25, self.options.udp_timeout / 4))  # never a busy loop
        self._sweeper = self.loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        for flow in self.flows.expire(self.loop.time()):
            flow.close()
            self.stats.flows_expired += 1
            self.stats.flows_active -= 1
        self._schedule_sweep()


def _to_target(flow: UdpFlow, data: memoryview, size: int, count: int) -> None:
    flow.listener._send(flow, data, size, count)


def _to_client(flow: UdpFlow, data: memoryview, size: int, count: int) -> None:
    flow.listener._reply(flow, data, size, count)


_TO_TARGET: Batcher[UdpFlow] = Batcher(_to_target)
_TO_CLIENT: Batcher[UdpFlow] = Batcher(_to_client)
"""One of each per process, shared by every listener and flow: they run on the loop
thread, and every read callback flushes its batcher before it returns, so a run never
outlives the callback that gathered it."""


def _is_wildcard(sock: socket.socket) -> bool:
    host = sock.getsockname()[0]
    return host in ("0.0.0.0", "::")
