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
    """
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


def setup_logging(level: str = "info") -> None:
    """Log to stderr; plain lines under journald (it stamps time and priority itself)."""
    under_journal = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "%(message)s" if under_journal else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=fmt, stream=sys.stderr, force=True)
