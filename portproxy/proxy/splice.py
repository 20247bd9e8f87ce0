"""Zero-copy forwarding with os.splice: socket → pipe → socket, through pooled pipes.

The kernel moves the pages; Python only sees byte counts. A pipe is borrowed from
the pool when bytes arrive and given back as soon as it is empty again, so an
idle connection holds its two sockets and no pipe (two fds fewer per direction:
thousands of idle connections stay well inside the fd limit).

A pump starts out copying (:class:`~.copy.CopyPump`, into a COPY_FIRST buffer) and
splices only once a read has filled that buffer: a request or a response of a few
hundred bytes costs less copied than moved through a pipe (no pool, no page
references, one call fewer in Python per read), and most connections never carry more.
"""

from __future__ import annotations

import fcntl
import os

from .copy import CopyPump
from .pump import BURST, DONE, READ, SMALL_READ, WRITE, Pump

COPY_FIRST = 64 * 1024
"""Bytes per read while copying; a read that fills it switches the pump to splice."""

_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


class Pipe:
    __slots__ = ("r", "w")

    def __init__(self, size: int) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, size)
        except OSError:
            pass  # above /proc/sys/fs/pipe-max-size without CAP_SYS_RESOURCE: keep the default

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class PipePool:
    """Empty pipes ready for reuse. Only empty pipes may be put back."""

    __slots__ = ("size", "_idle", "_max_idle")

    def __init__(self, size: int, max_idle: int) -> None:
        self.size = size
        self._idle: list[Pipe] = []
        self._max_idle = max_idle

    def get(self) -> Pipe:
        if self._idle:
            return self._idle.pop()
        return Pipe(self.size)

    def put(self, pipe: Pipe) -> None:
        if len(self._idle) < self._max_idle:
            self._idle.append(pipe)
        else:
            pipe.close()

    def discard(self, pipe: Pipe) -> None:
        """Close a pipe that may still hold bytes (its connection died)."""
        pipe.close()

    def close(self) -> None:
        for pipe in self._idle:
            pipe.close()
        self._idle.clear()


class SplicePump(CopyPump):
    __slots__ = ("_pool", "_pipe", "_in_pipe")

    read_size = COPY_FIRST

    def __init__(self, *args: object, pool: PipePool) -> None:
        Pump.__init__(self, *args)  # type: ignore[arg-type]
        self._pending = None  # (CopyPump's, set here: one Python frame fewer per pump)
        self._pool = pool
        self._pipe: Pipe | None = None
        self._in_pipe = 0
        """Bytes in the borrowed pipe, not yet written to dst."""

    def _filled(self) -> bool:
        # The pump becomes a _Splicing one: the same slots, _forward replaced. (A flag
        # tested on every read would cost a Python frame per read while copying.)
        self.__class__ = _Splicing
        return True

    def _splice_forward(self) -> int:
        pool = self._pool
        size = pool.size
        src = self._src_fd
        pipe = self._pipe
        if pipe is None:
            pipe = self._pipe = pool.get()
        for _ in range(BURST):
            try:
                n = os.splice(src, pipe.w, size, flags=_FLAGS)
            except BlockingIOError:
                break
            if n == 0:
                self._give_back()
                return DONE
            self._totals[self._index] += n
            self.moved += n
            self._in_pipe = n
            if not self._drain():
                return WRITE
            if n < SMALL_READ and not self._io.peer_closed:
                break
        self._give_back()
        return READ

    def _drain(self) -> bool:
        """Write the pipe's bytes to dst; keep the pipe either way."""
        pipe = self._pipe
        assert pipe is not None
        pending = self._in_pipe
        dst = self._dst_fd
        while pending:
            try:
                pending -= os.splice(pipe.r, dst, pending, flags=_FLAGS)
            except BlockingIOError:
                self._in_pipe = pending
                return False
        self._in_pipe = 0
        return True

    def _flush(self) -> bool:
        if self._pending is not None:  # still copying
            return CopyPump._flush(self)
        if self._drain():
            self._give_back()
            return True
        return False

    def _give_back(self) -> None:
        pipe = self._pipe
        if pipe is not None:
            self._pipe = None
            self._pool.put(pipe)

    def release(self) -> None:
        pipe = self._pipe
        if pipe is not None:
            self._pipe = None
            if self._in_pipe:
                self._pool.discard(pipe)
            else:
                self._pool.put(pipe)


class _Splicing(SplicePump):
    """A SplicePump past its copying phase."""

    __slots__ = ()
    _forward = SplicePump._splice_forward
