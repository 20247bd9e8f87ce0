"""Readiness for the TCP relays' sockets from one epoll set of the proxy's own.

Why not ``loop.add_reader`` per socket: uvloop builds a libuv poll handle the first
time an fd gets a watcher and tears it down when the fd has none left, and each
build costs an ioctl and an epoll_ctl ADD+DEL probe before the real registration.
A short connection went through that three or four times: 12 epoll_ctl and 3 ioctl
calls per connection, a third of the proxy's CPU at a few thousand connections per
second. Here a socket is registered once, its interest changes with one MOD when a
pump switches between reading and writing, and it leaves the set when it is closed
(the kernel drops closed fds from an epoll set; ``forget`` only clears our tables).
Readers are registered with EPOLLRDHUP as well, and :attr:`Poller.peer_closed` tells a
reader that its peer's FIN (or an error) is in: the read that follows a short one is
then the EOF, taken in the same callback instead of on one more wake-up.

A third kind of interest, :meth:`add_hangup`, asks for no event at all: epoll reports
an error or a hang-up (a reset, a close) of every fd in the set regardless, so an fd
registered with an empty mask wakes the poller only when its peer is gone. A relay
uses it for the client while its connect to the target is still pending.

The set's own fd is watched by the event loop, so everything still runs on the loop
thread, in loop callbacks, in the order the loop gives. Level-triggered, like the
loop's own readers and writers: a callback may stop early (a burst limit) and will be
called again.
"""

from __future__ import annotations

import asyncio
import select
from typing import Callable

_IN = select.EPOLLIN
_RDHUP = select.EPOLLRDHUP
_OUT = select.EPOLLOUT
_READING = _IN | _RDHUP
_FAIL = select.EPOLLERR | select.EPOLLHUP
_MAX_EVENTS = 256

Callback = Callable[[], None]


class Poller:
    """add_reader / remove_reader / add_writer / remove_writer, as the loop has them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll = select.epoll()
        self._readers: dict[int, Callback] = {}
        self._writers: dict[int, Callback] = {}
        self._hangups: dict[int, Callback] = {}
        self._masks: dict[int, int] = {}
        self.peer_closed = False
        """While a reader callback runs: its fd has seen the peer's FIN (or an error), so
        a read that comes up short is not the end of what is there — EOF follows. A
        pump reads on instead of waiting for one more wake-up to learn that."""
        loop.add_reader(self._epoll.fileno(), self._dispatch)

    def close(self) -> None:
        if self._epoll.closed:
            return
        self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
        self._readers.clear()
        self._writers.clear()
        self._hangups.clear()
        self._masks.clear()

    # --- the loop's interface -----------------------------------------------------------
    def add_reader(self, fd: int, callback: Callback) -> None:
        self._readers[fd] = callback
        if fd not in self._masks:  # a new fd (every connection's two): register it directly
            self._masks[fd] = _READING
            try:
                self._epoll.register(fd, _READING)
            except FileExistsError:  # closed and reused without forget(): take it over
                self._epoll.modify(fd, _READING)
            return
        self._update(fd)

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            self._update(fd)

    def add_writer(self, fd: int, callback: Callback) -> None:
        self._writers[fd] = callback
        self._update(fd)

    def remove_writer(self, fd: int) -> None:
        if self._writers.pop(fd, None) is not None:
            self._update(fd)

    def add_hangup(self, fd: int, callback: Callback) -> None:
        """Call back when fd reports an error or a hang-up (EPOLLERR / EPOLLHUP) — and for
        nothing else: a peer that only half-closes or sends bytes does not wake it."""
        self._hangups[fd] = callback
        self._update(fd)

    def remove_hangup(self, fd: int) -> None:
        """Stop watching for hang-ups. Cheapest after add_reader / add_writer on the same
        fd: it is registered already, and nothing changes in the kernel."""
        if self._hangups.pop(fd, None) is not None:
            self._update(fd)

    def forget(self, fd: int) -> None:
        """The fd is about to be closed: drop it from our tables without a syscall."""
        self._readers.pop(fd, None)
        self._writers.pop(fd, None)
        self._hangups.pop(fd, None)
        self._masks.pop(fd, None)

    # --- internals ----------------------------------------------------------------------
    def _update(self, fd: int) -> None:
        mask = (_READING if fd in self._readers else 0) | (_OUT if fd in self._writers else 0)
        old = self._masks.get(fd)
        if old == mask:
            return
        epoll = self._epoll
        if mask == 0 and fd not in self._hangups:
            # Not MOD to an empty mask: hang-ups are reported regardless, and
            # level-triggered they would wake the loop until the fd is closed.
            del self._masks[fd]
            try:
                epoll.unregister(fd)
            except OSError:
                pass
            return
        self._masks[fd] = mask
        if old is None:
            try:
                epoll.register(fd, mask)
            except FileExistsError:  # closed and reused without forget(): take it over
                epoll.modify(fd, mask)
        else:
            try:
                epoll.modify(fd, mask)
            except FileNotFoundError:  # closed behind our back and reused
                epoll.register(fd, mask)

    def _dispatch(self) -> None:
        try:
            events = self._epoll.poll(0, _MAX_EVENTS)
        except InterruptedError:
            return
        readers = self._readers
        writers = self._writers
        hangups = self._hangups
        for fd, mask in events:
            # A callback earlier in this batch may have closed this fd (and a new
            # socket may have it now): the tables say what is current, and a spurious
            # wake-up only costs the callee an EAGAIN.
            try:
                if mask & (_IN | _RDHUP | _FAIL):
                    callback = readers.get(fd)
                    if callback is not None:
                        self.peer_closed = bool(mask & (_RDHUP | _FAIL))
                        callback()
                        self.peer_closed = False
                if mask & (_OUT | _FAIL):
                    callback = writers.get(fd)
                    if callback is not None:
                        callback()
                if mask & _FAIL:
                    callback = hangups.get(fd)
                    if callback is not None:
                        callback()
            except Exception as exc:  # noqa: BLE001 - one connection's bug must not stop the others
                self.peer_closed = False
                self._loop.call_exception_handler({"message": "poller callback failed", "exception": exc})
