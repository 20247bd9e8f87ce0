"""UDP: a bounded flow table keyed by client address, one connected backend socket per flow.

Each client address gets its own socket connected to the target, so the target
sees one stable source port per client (as with docker-proxy) and its replies
come back on a socket that already knows whom they belong to. Replies leave the
listening socket *from the address the client sent to*: on a wildcard listener
that address is taken from IP_PKTINFO / IPV6_PKTINFO, otherwise a multi-homed
host would answer from whatever address its routing table picks.

The flows live in a :class:`~.flowtable.FlowTable` (idle expiry after ``udp_timeout``,
eviction of the least recently active flow past ``max_udp_flows``). Datagrams already
queued when the listener is read go to the target in GSO runs gathered by a
:class:`~.gso.Batcher`. Both are plain objects, tested without sockets; this module
does the I/O. The flows' sockets sit on the proxy's :class:`~.poller.Poller`, like the
TCP relays', so a flow costs no event-loop handle of its own.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
from typing import TYPE_CHECKING

from .flowtable import FlowTable
from .gso import MAX_DATAGRAM, Batcher
from .listener import Listener
from .poller import Poller
from .source import ClientSource
from .stats import UdpStats

if TYPE_CHECKING:
    from .options import ProxyOptions

log = logging.getLogger("portproxy.udp")

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IP_MTU = getattr(socket, "IP_MTU", 14)
IPV6_MTU = getattr(socket, "IPV6_MTU", 24)
SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
_GSO_UNSUPPORTED = {errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP}
_BATCH = 64
_CMSG_SPACE = socket.CMSG_SPACE(64)
_buffer = bytearray(MAX_DATAGRAM)
_view = memoryview(_buffer)


class UdpFlow:
    __slots__ = ("listener", "client", "sock", "fd", "reply_cmsg", "last", "gso_max")

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

    def on_readable(self) -> None:
        """Datagrams from the target: send each back to the client."""
        listener = self.listener
        sock = self.sock
        got = False
        for _ in range(_BATCH):
            try:
                n = sock.recv_into(_buffer)
            except BlockingIOError:
                break
            except OSError as exc:
                # Typically ICMP port unreachable from the target (ECONNREFUSED): reading
                # it cleared it and the flow lives on.
                if not isinstance(exc, ConnectionRefusedError):
                    listener.stats.send_errors[errno.errorcode.get(exc.errno or 0, "other")] += 1
                continue
            got = True
            listener.reply(self, _view[:n])
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


def _reply_cmsg(ancdata: list) -> list:
    """Turn received PKTINFO into the cmsg that makes the reply leave from that address."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            _ifindex, _spec_dst, header_dst = struct.unpack_from("=i4s4s", data)
            return [(socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, header_dst, b"\0" * 4))]
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 20:
            addr, ifindex = struct.unpack_from("=16sI", data)
            # Keep the interface only where the address needs it (link-local).
            keep = ifindex if addr[:2] == b"\xfe\x80" else 0
            return [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, struct.pack("=16sI", addr, keep))]
    return []


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
        self._batcher: Batcher[UdpFlow] = Batcher(self._send)
        self._pktinfo = _is_wildcard(sock)
        if self._pktinfo:
            if sock.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        self._sweeper: asyncio.TimerHandle | None = None
        self._gso = True
        """Batch runs of equal-sized datagrams with UDP_SEGMENT until the kernel refuses it."""
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
        batcher = self._batcher
        now = self.loop.time()
        pktinfo = self._pktinfo
        for _ in range(_BATCH):
            try:
                if pktinfo:
                    n, ancdata, _flags, client = sock.recvmsg_into([batcher.slot()], _CMSG_SPACE)
                else:
                    n, client = sock.recvfrom_into(batcher.slot())
                    ancdata = []
            except BlockingIOError:
                break
            except OSError as exc:
                stats.send_errors[errno.errorcode.get(exc.errno or 0, "other")] += 1
                continue
            stats.datagrams_to_target += 1
            stats.bytes_to_target += n
            flow = flows.get(client)
            if flow is None:
                batcher.cut(n)  # the run so far goes first: opening a flow may evict its flow
                flow = self._open_flow(client, ancdata, now)
                if flow is None:
                    continue
            elif flow is not batcher.flow:
                flows.touch(client, now)  # (a run's later datagrams share its first one's time)
            batcher.add(flow, n, self._gso and n <= flow.gso_max)
        batcher.flush()

    def _send(self, flow: UdpFlow, data: memoryview, size: int, count: int) -> None:
        """Send ``count`` datagrams of ``size`` bytes (the last may be shorter) to the target:
        one send() for a lone datagram, one GSO sendmsg() for a run of them."""
        sock = flow.sock
        segment = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))] if count > 1 else None
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
                if segment is None or exc.errno not in _GSO_UNSUPPORTED:
                    self.stats.send_errors[errno.errorcode.get(exc.errno or 0, "other")] += count
                    return
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
        flow = UdpFlow(self, client, up, _reply_cmsg(ancdata))
        self.flows.add(client, flow, now)
        self.poller.add_reader(flow.fd, flow.on_readable)
        stats.flows_created += 1
        stats.flows_active += 1
        return flow

    # --- target → client ----------------------------------------------------
    def reply(self, flow: UdpFlow, data: memoryview) -> None:
        stats = self.stats
        try:
            if flow.reply_cmsg:
                self.sock.sendmsg([data], flow.reply_cmsg, 0, flow.client)
            else:
                self.sock.sendto(data, flow.client)
        except OSError as exc:
            stats.send_errors[errno.errorcode.get(exc.errno or 0, "other")] += 1
            return
        stats.datagrams_to_client += 1
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


def _is_wildcard(sock: socket.socket) -> bool:
    host = sock.getsockname()[0]
    return host in ("0.0.0.0", "::")
