"""UDP: a bounded flow table keyed by client address, one connected backend socket per flow.

Each client address gets its own socket connected to the target, so the target
sees one stable source port per client (as with docker-proxy) and its replies
come back on a socket that already knows whom they belong to. Replies leave the
listening socket *from the address the client sent to*: on a wildcard listener
that address is taken from IP_PKTINFO / IPV6_PKTINFO, otherwise a multi-homed
host would answer from whatever address its routing table picks.

Flows are kept in least-recently-active order, which gives both idle expiry
(``udp_timeout``) and eviction of the oldest idle flow when the table is full
(``max_udp_flows``) in O(1) per datagram.

Datagrams that are already queued when the listener is read are sent to the target in
batches: consecutive datagrams of one flow with the same size (the last may be shorter)
go out in one ``sendmsg`` with UDP_SEGMENT (UDP GSO), so the route lookup, netfilter,
the bridge and the veth hop are paid once per batch instead of once per datagram; the
target still receives them one by one, each with its own boundaries. Nothing waits to
fill a batch: a lone datagram is sent at once, as before.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import socket
import struct
from typing import TYPE_CHECKING

from .listener import Listener
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
MAX_DATAGRAM = 65535
GSO_MAX_BYTES = 65000
"""Payload of one GSO send: it must fit one IP packet of at most 64 KiB."""
GSO_MAX_SEGMENTS = 64
"""UDP_MAX_SEGMENTS of older kernels."""
_GSO_UNSUPPORTED = {errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP}
_BATCH = 64
_CMSG_SPACE = socket.CMSG_SPACE(64)
_buffer = bytearray(MAX_DATAGRAM)
_view = memoryview(_buffer)
_gather = bytearray(GSO_MAX_BYTES + MAX_DATAGRAM)
"""Where the listener gathers a batch: one batch plus room for the next datagram."""
_gather_view = memoryview(_gather)


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
        failed = False
        for _ in range(_BATCH):
            try:
                n = sock.recv_into(_buffer)
            except BlockingIOError:
                break
            except OSError as exc:
                # Typically ICMP port unreachable from the target (ECONNREFUSED): reading
                # it cleared it and the flow lives on.
                failed = True
                if not isinstance(exc, ConnectionRefusedError):
                    listener.stats.send_errors[errno.errorcode.get(exc.errno or 0, "other")] += 1
                continue
            got = True
            listener.reply(self, _view[:n])
        if failed:
            # libuv (uvloop) stops polling an fd once it reports POLLERR; watch it afresh.
            loop = listener.loop
            loop.remove_reader(self.fd)
            loop.add_reader(self.fd, self.on_readable)
        if got:
            self.last = listener.loop.time()
            listener.touch(self)

    def close(self) -> None:
        self.listener.loop.remove_reader(self.fd)
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
        stats: UdpStats | None = None,
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.target = target
        self.target_family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
        self.name = name
        self.options = options
        self.stats: UdpStats = stats if stats is not None else UdpStats()
        self.source = ClientSource(target[0], name, self.stats.source_fallbacks) \
            if options.source == "client" else None
        """Transparent mode: each flow socket is bound to its client's address and port."""
        self.flows: collections.OrderedDict[tuple, UdpFlow] = collections.OrderedDict()
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
        for flow in self.flows.values():
            flow.close()
        self.stats.flows_active -= len(self.flows)
        self.flows.clear()
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
        """Read what is queued; send it on per flow, equal-sized runs as one GSO batch.

        The batch being gathered is ``_gather[:end]``: ``count`` datagrams of ``size``
        bytes for ``batch_flow``. Each datagram is read in right behind it; one that
        cannot join is moved to the front once the batch before it has been sent."""
        sock = self.sock
        stats = self.stats
        flows = self.flows
        now = self.loop.time()
        pktinfo = self._pktinfo
        batch_flow: UdpFlow | None = None
        size = end = count = 0
        for _ in range(_BATCH):
            try:
                if pktinfo:
                    n, ancdata, _flags, client = sock.recvmsg_into([_gather_view[end:]], _CMSG_SPACE)
                else:
                    n, client = sock.recvfrom_into(_gather_view[end:])
                    ancdata = []
            except BlockingIOError:
                break
            except OSError as exc:
                stats.send_errors[errno.errorcode.get(exc.errno or 0, "other")] += 1
                continue
            stats.datagrams_to_target += 1
            stats.bytes_to_target += n
            flow = flows.get(client)
            if flow is not None:
                if count and flow is batch_flow and n <= size and count < GSO_MAX_SEGMENTS \
                        and end + n <= GSO_MAX_BYTES:
                    end += n
                    count += 1
                    if n < size:  # a shorter datagram can only be a batch's last
                        self._send(batch_flow, _gather_view[:end], size, count)
                        batch_flow, end, count = None, 0, 0
                    continue
                flows.move_to_end(client)
            if count:  # the batch so far goes first (also before a new flow may evict its flow)
                assert batch_flow is not None
                self._send(batch_flow, _gather_view[:end], size, count)
                _gather[:n] = _gather[end:end + n]
                batch_flow, end, count = None, 0, 0
            if flow is None:
                flow = self._open_flow(client, ancdata)
                if flow is None:
                    end = 0
                    continue
            flow.last = now
            if n <= flow.gso_max and self._gso:
                batch_flow, size, end, count = flow, n, n, 1
            else:
                self._send(flow, _gather_view[:n], n, 1)
                end = 0
        if count:
            assert batch_flow is not None
            self._send(batch_flow, _gather_view[:end], size, count)

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

    def _open_flow(self, client: tuple, ancdata: list) -> UdpFlow | None:
        stats = self.stats
        if len(self.flows) >= self.options.max_udp_flows:
            _, oldest = self.flows.popitem(last=False)
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
        self.flows[client] = flow
        self.loop.add_reader(flow.fd, flow.on_readable)
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

    def touch(self, flow: UdpFlow) -> None:
        if flow.client in self.flows:
            self.flows.move_to_end(flow.client)

    # --- expiry -------------------------------------------------------------
    def _schedule_sweep(self) -> None:
        interval = min(1.0, self.options.udp_timeout / 4)
        self._sweeper = self.loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        deadline = self.loop.time() - self.options.udp_timeout
        flows = self.flows
        while flows:
            client, flow = next(iter(flows.items()))
            if flow.last > deadline:
                break
            del flows[client]
            flow.close()
            self.stats.flows_expired += 1
            self.stats.flows_active -= 1
        self._schedule_sweep()


def _is_wildcard(sock: socket.socket) -> bool:
    host = sock.getsockname()[0]
    return host in ("0.0.0.0", "::")
