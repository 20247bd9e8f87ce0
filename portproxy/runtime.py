"""Process-level set-up shared by every long-running command: event loop, fd limit, logging."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import sys
from typing import Awaitable, Callable, Literal, TypeVar

T = TypeVar("T")
LoopName = Literal["uvloop", "asyncio"]


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return the new soft limit.

    A proxy holds two sockets per connection (and two pipe fds per busy direction),
    so the usual soft limit of 1024 would cap it at a few hundred connections.

    Past 1024, a descriptor no longer fits select()'s fd_set, which libnftables waits
    with; so first a few low descriptors are reserved for its netlink sockets (see
    :class:`portproxy.kernel.executor.LowDescriptors`). Call this at process start,
    before any port is opened.
    """
    from .kernel.executor import reserve_low_descriptors

    reserve_low_descriptors()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
        except (ValueError, OSError):
            return soft
    return soft


def run(main: Callable[[], Awaitable[T]], loop: LoopName = "uvloop") -> T:
    """Run ``main()`` on a fresh loop of the chosen kind."""
    if loop == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())  # type: ignore[arg-type]


class JournalFormatter(logging.Formatter):
    """``<N>message``: the syslog priority prefix journald understands (sd-daemon(3)); no
    timestamp, the journal adds its own."""

    PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}

    def format(self, record: logging.LogRecord) -> str:
        priority = self.PRIORITIES.get(record.levelno, 6)
        return f"<{priority}>{record.name}: {super().format(record)}"


def _stderr_is_journal() -> bool:
    """JOURNAL_STREAM names the journal's stream as device:inode; compare with fd 2."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in stream.split(":"))
        st = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def setup_logging(level: str = "info") -> None:
    """Log to stderr; under journald, priority-prefixed lines without timestamps."""
    handler = logging.StreamHandler(sys.stderr)
    if _stderr_is_journal():
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)
