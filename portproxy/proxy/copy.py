"""Plain-copy forwarding: recv_into one shared buffer, then send.

The whole of ``--no-splice``, and the first phase of every splice pump (see
:mod:`.splice`): small reads cost less copied than spliced. The buffer is shared by
every pump of the loop: callbacks run one at a time, and whatever the receiver did
not take is copied out into a per-pump remainder before the callback returns.
"""

from __future__ import annotations

from .pump import BURST, DONE, READ, SMALL_READ, WRITE, Pump

BUFFER_SIZE = 256 * 1024
_buffer = bytearray(BUFFER_SIZE)
_view = memoryview(_buffer)


class CopyPump(Pump):
    __slots__ = ("_pending",)

    read_size = BUFFER_SIZE
    """Bytes asked of one recv."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self._pending: memoryview | None = None

    def _filled(self) -> bool:
        """A read filled the buffer and all of it was sent: True if the pump switched to
        another way of forwarding (then ``_forward`` goes on with that one)."""
        return False

    def _forward(self) -> int:
        src = self.src
        dst = self.dst
        size = self.read_size
        for _ in range(BURST):
            try:
                n = src.recv_into(_buffer, size)
            except BlockingIOError:
                return READ
            if n == 0:
                return DONE
            self._totals[self._index] += n
            self.moved += n
            try:
                sent = dst.send(_view[:n])
            except BlockingIOError:
                sent = 0
            if sent < n:
                self._pending = memoryview(bytes(_view[sent:n]))
                return WRITE
            if n == size and self._filled():
                return self._forward()
            if n < SMALL_READ and not self._io.peer_closed:
                break
        return READ

    def _flush(self) -> bool:
        pending = self._pending
        assert pending is not None
        try:
            sent = self.dst.send(pending)
        except BlockingIOError:
            return False
        if sent < len(pending):
            self._pending = pending[sent:]
            return False
        self._pending = None
        return True
