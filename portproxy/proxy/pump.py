"""One direction of a TCP relay, driven by the event loop's readiness callbacks.

A pump moves bytes from ``src`` to ``dst``. It reads only while nothing is waiting
to be written, so a slow receiver stops the reads (back-pressure) instead of
filling memory. It watches exactly one event at a time: "src readable" while it
can forward, "dst writable" while it is blocked on a full send buffer.

Subclasses decide where the bytes wait in between: a pipe (:mod:`.splice`) or a
byte string (:mod:`.copy`). The connection (:mod:`.tcp`) is told when the pump
has seen EOF and forwarded everything (to half-close ``dst``), or when a socket
error happened (to reset both sides).

Callbacks rather than coroutines: a pump is a few slots, not a task with a frame,
which keeps idle connections cheap and connection setup fast.
"""

from __future__ import annotations

import socket
from typing import Callable, Protocol

READ = 0
"""Waiting for src to be readable."""
WRITE = 1
"""Bytes are pending; waiting for dst to be writable."""
DONE = 2
"""src reached EOF and every byte was forwarded."""

BURST = 8
"""Read/forward rounds per readiness callback, to amortise the loop's overhead
without starving the other connections."""

SMALL_READ = 16384
"""A read this short ends the burst: request/response traffic rarely has more waiting,
and readiness is level-triggered, so stopping costs nothing when it has; reading on
would cost an EAGAIN per message. Unless the peer has closed (``peer_closed``): then
the next read is the EOF, and reading it now saves a wake-up per connection."""


class Readiness(Protocol):
    """Who tells a pump its sockets are ready: the proxy's :class:`~.poller.Poller`
    (an event loop has the same four methods, but not ``peer_closed``)."""

    peer_closed: bool
    """True while a reader callback runs for an fd whose peer has closed its side."""

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None: ...
    def remove_reader(self, fd: int) -> None: ...
    def add_writer(self, fd: int, callback: Callable[[], None]) -> None: ...
    def remove_writer(self, fd: int) -> None: ...


class PumpOwner(Protocol):
    def pump_done(self, pump: "Pump") -> None: ...
    def pump_failed(self, pump: "Pump", exc: OSError) -> None: ...
    def pump_read(self, pump: "Pump") -> None:
        """The pump has just read from src; told only while its ``watched`` is set."""


class Pump:
    __slots__ = ("_io", "src", "dst", "_src_fd", "_dst_fd", "_owner", "_state", "_totals", "_index", "watched",
                 "moved", "done")

    def __init__(
        self,
        io: Readiness,
        src: socket.socket,
        dst: socket.socket,
        owner: PumpOwner,
        totals: list[int],
        index: int,
    ) -> None:
        """``totals[index]`` is the byte counter this pump adds to (a plain list slot:
        the cheapest shared integer there is on the hot path)."""
        self._io = io
        self.src = src
        self.dst = dst
        self._src_fd = src.fileno()
        self._dst_fd = dst.fileno()
        self._owner = owner
        self._state = -1
        self._totals = totals
        self._index = index
        self.watched = False
        """Tell the owner after each read (one attribute test per read while not set)."""
        self.moved = 0
        """Bytes read from src by this pump."""
        self.done = False
        """src reached EOF and every byte was forwarded, or the pump was stopped."""

    # --- subclass interface -------------------------------------------------
    def _forward(self) -> int:
        """Read from src and write to dst until one blocks; return READ, WRITE or DONE."""
        raise NotImplementedError

    def _flush(self) -> bool:
        """Write pending bytes to dst; True when none are left."""
        raise NotImplementedError

    def release(self) -> None:
        """Give back buffers (called once the pump is stopped for good)."""

    # --- state machine ------------------------------------------------------
    def start(self) -> None:
        """Begin reading (from the state of a new pump: nothing is watched yet)."""
        self._state = READ
        self._io.add_reader(self._src_fd, self._on_readable)

    def read_now(self) -> None:
        """Read as if src had been reported readable (nothing there costs one EAGAIN)."""
        if self._state == READ:
            self._on_readable()

    def stop(self) -> None:
        """Stop watching both sockets; safe to call more than once."""
        if self._state == READ:
            self._io.remove_reader(self._src_fd)
        elif self._state == WRITE:
            self._io.remove_writer(self._dst_fd)
        self._state = DONE
        self.done = True

    def abandon(self) -> None:
        """Stop for good when the sockets are about to be closed (and their fds
        forgotten by the poller): no readiness calls, buffers given back."""
        self._state = DONE
        self.done = True
        self.release()

    def _enter(self, state: int) -> None:
        old = self._state
        if old == state:
            return
        if state == DONE:
            # The owner first: when this was the last direction it closes the connection,
            # and the fds leave the poller with the close instead of one syscall each.
            self._state = DONE
            self.done = True
            self._owner.pump_done(self)
            if old == READ:
                self._io.remove_reader(self._src_fd)
            elif old == WRITE:
                self._io.remove_writer(self._dst_fd)
            return
        if old == READ:
            self._io.remove_reader(self._src_fd)
        elif old == WRITE:
            self._io.remove_writer(self._dst_fd)
        self._state = state
        if state == READ:
            self._io.add_reader(self._src_fd, self._on_readable)
        else:
            self._io.add_writer(self._dst_fd, self._on_writable)

    def _on_readable(self) -> None:
        try:
            state = self._forward()
        except OSError as exc:
            self._owner.pump_failed(self, exc)
            return
        if self.watched:
            self._owner.pump_read(self)
        if state != READ:
            self._enter(state)

    def _on_writable(self) -> None:
        try:
            flushed = self._flush()
        except OSError as exc:
            self._owner.pump_failed(self, exc)
            return
        if flushed:
            self._enter(READ)
