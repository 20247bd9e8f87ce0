"""Gathering datagrams into UDP GSO runs: consecutive datagrams of one flow, equal sizes.

One ``sendmsg`` with UDP_SEGMENT sends a run of datagrams of one size (the last may be
shorter); the kernel splits it again, so the receiver gets each datagram with its own
boundaries while routing, netfilter and the bridge are paid once per run.

:class:`Batcher` is plain data: the listener reads each datagram into :meth:`slot`
(right behind the run being gathered, so nothing is copied on the fast path) and says
whose it is; the batcher hands finished runs to ``send``. Nothing waits to fill a run:
the listener flushes once the socket has nothing more queued. A socket with UDP_GRO
hands over a run of one flow's datagrams in one receive (the segment size in a cmsg):
it joins the run being gathered, or becomes one, exactly like that many single reads.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

MAX_DATAGRAM = 65535
GSO_MAX_BYTES = 65000
"""Payload of one GSO send: it must fit one IP packet of at most 64 KiB."""
GSO_MAX_SEGMENTS = 64
"""UDP_MAX_SEGMENTS of older kernels."""

F = TypeVar("F")


def segments(n: int, size: int) -> int:
    """How many datagrams ``n`` bytes read with segment size ``size`` hold (0: one)."""
    return 1 if size <= 0 or size >= n else -(-n // size)

Send = Callable[[F, memoryview, int, int], None]
"""send(flow, data, size, count): ``count`` datagrams of ``size`` bytes (the last may be
shorter) back to back in ``data``; valid only during the call."""


class Batcher(Generic[F]):
    __slots__ = ("_send", "_buffer", "_view", "_max_bytes", "_max_segments", "flow", "_size", "_end", "_count")

    def __init__(self, send: Send[F], max_bytes: int = GSO_MAX_BYTES, max_segments: int = GSO_MAX_SEGMENTS) -> None:
        self._send = send
        self._buffer = bytearray(max_bytes + MAX_DATAGRAM)
        """One run plus room for the next datagram."""
        self._view = memoryview(self._buffer)
        self._max_bytes = max_bytes
        self._max_segments = max_segments
        self.flow: F | None = None
        """Whose run is being gathered (None: no run)."""
        self._size = 0
        self._end = 0
        self._count = 0

    def slot(self) -> memoryview:
        """Where the next datagram must be read into."""
        return self._view[self._end:]

    def add(self, flow: F, n: int, batchable: bool, size: int = 0) -> None:
        """The ``n`` bytes just read into :meth:`slot` are ``flow``'s: one datagram, or, with
        ``0 < size < n``, a run of datagrams of ``size`` bytes (the last may be shorter) as
        one UDP_GRO receive hands them over.

        ``batchable``: they may go out in a GSO run (a segment fits the route's MTU and the
        kernel does GSO); otherwise each is sent alone, after the run before them."""
        if size <= 0 or size >= n:
            size, count = n, 1
        else:
            count = -(-n // size)
        if batchable and self._count and flow is self.flow and (size == self._size or (count == 1 and n < self._size)) \
                and self._count + count <= self._max_segments and self._end + n <= self._max_bytes:
            self._end += n
            self._count += count
            if n % self._size:  # a shorter datagram can only be a run's last
                self.flush()
            return
        if self._count:
            self.cut(n)
        if not batchable:
            for offset in range(0, n, size):
                end = min(offset + size, n)
                self._send(flow, self._view[offset:end], end - offset, 1)
        elif count <= self._max_segments and n <= self._max_bytes:
            self.flow, self._size, self._end, self._count = flow, size, n, count
            if count > 1 and n % size:
                self.flush()
        else:  # a received run larger than one send may carry: in pieces of whole segments
            step = size * max(1, min(self._max_segments, self._max_bytes // size))
            for offset in range(0, n, step):
                end = min(offset + step, n)
                self._send(flow, self._view[offset:end], size, -(-(end - offset) // size))

    def cut(self, n: int) -> None:
        """Send the run so far and move the ``n`` bytes just read to the front.

        Called before a datagram of a new flow is looked at: opening its flow may evict
        the flow whose run is pending, which must go out first."""
        if not self._count:
            return
        end = self._end
        self._send_run()
        self._buffer[:n] = self._buffer[end:end + n]

    def flush(self) -> None:
        """Send the run being gathered, if any."""
        if self._count:
            self._send_run()

    def _send_run(self) -> None:
        flow, data, size, count = self.flow, self._view[:self._end], self._size, self._count
        self.flow, self._end, self._count = None, 0, 0
        assert flow is not None
        self._send(flow, data, size, count)
