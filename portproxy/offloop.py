"""Blocking work off the event loop's thread, in one place.

A call leaves the loop's thread for one of two reasons: it blocks (netlink, libnftables,
a lock file, transparent mode's routing) and the loop must go on relaying; or it must not
run on a thread whose event loop is running at all: pyroute2's synchronous API refuses
to, and never works on uvloop (pyroute2#1335). Everything here runs the call on a thread
that has no running event loop, and returns its result or raises its exception:

* ``await run(fn, *args)`` — in the loop's default executor; the loop goes on. For
  coroutines (``portproxy map``, the drop-in, the daemon's reads that may run beside its
  worker).
* ``call(fn, *args)`` and the decorator :func:`off_loop` — for synchronous code that may
  be reached from the loop's thread (a listener reading its target's link when it is
  added): there, on a short-lived thread of its own, joined, so the loop waits (for short
  calls only); on any other thread, right there.
* ``in_fresh_thread(fn, *args, enter=...)`` — always a new thread, joined; ``enter`` runs on
  it first (setns is per thread: the thread that entered a namespace ends with the call).
* :class:`Worker` — one thread of its own, calls in the order they were made: for a
  libnftables context (one thread's) and changes that must not overtake each other.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")


async def run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in the running loop's default executor."""
    return await asyncio.to_thread(fn, *args, **kwargs)


def in_fresh_thread(fn: Callable[..., T], *args: Any, enter: Callable[[], None] | None = None) -> T:
    """``fn(*args)`` on a new plain thread (after ``enter()`` there), waited for."""
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            if enter is not None:
                enter()
            result.append(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            error.append(exc)

    thread = threading.Thread(target=body, name="portproxy-netlink")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def loop_running() -> bool:
    """Whether the calling thread runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, on a thread of its own if this thread runs an event loop."""
    if not loop_running():
        return fn(*args, **kwargs)
    return in_fresh_thread(functools.partial(fn, *args, **kwargs))


def off_loop(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` made to run through :func:`call`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        return call(fn, *args, **kwargs)

    return wrapper


class Worker:
    """One thread of its own that runs calls one at a time, in the order they were made."""

    def __init__(self, name: str = "portproxy-worker") -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the worker, after every call made before it."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        """Wait for the calls already made, then end the thread; later calls raise RuntimeError."""
        self._executor.shutdown(wait=True)
