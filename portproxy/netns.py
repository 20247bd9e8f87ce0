"""Netlink work off the event loop.

pyroute2's synchronous API cannot run on a thread whose event loop is running (and
never on uvloop, pyroute2#1335), so every netlink call made from async code goes
through :func:`off_loop`, which moves it to a short-lived plain thread when needed.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def _call_in_thread(fn: Callable[..., T], *args: Any, enter: Callable[[], None] | None = None) -> T:
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


def off_loop(fn: Callable[..., T]) -> Callable[..., T]:
    """Run ``fn`` on a plain thread if the calling thread has a running event loop."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return fn(*args, **kwargs)
        return _call_in_thread(functools.partial(fn, *args, **kwargs))

    return wrapper
