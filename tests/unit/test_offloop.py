"""Blocking work off the event loop (portproxy.offloop): where each helper runs a call. No root."""

from __future__ import annotations

import asyncio
import threading

import pytest
import uvloop

from portproxy import offloop


def where() -> tuple[int, bool]:
    """(this thread, whether it runs an event loop)."""
    return threading.get_ident(), offloop.loop_running()


def fail() -> None:
    raise KeyError("from the thread")


def test_call_without_a_loop_runs_right_here() -> None:
    assert offloop.call(where) == (threading.get_ident(), False)
    with pytest.raises(KeyError):
        offloop.call(fail)


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_call_on_a_loops_thread_runs_on_a_thread_without_a_loop(loop_factory) -> None:
    async def main() -> None:
        ident, running = offloop.call(where)
        assert ident != threading.get_ident() and not running
        with pytest.raises(KeyError):
            offloop.call(fail)
        ident, running = offloop.off_loop(where)()
        assert ident != threading.get_ident() and not running

    loop = loop_factory()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def test_off_loop_keeps_the_function_s_name_and_arguments() -> None:
    @offloop.off_loop
    def add(a: int, b: int = 0) -> int:
        """Adds."""
        return a + b

    assert (add.__name__, add.__doc__, add(1, b=2)) == ("add", "Adds.", 3)


async def test_run_lets_the_loop_go_on() -> None:
    release = threading.Event()
    task = asyncio.ensure_future(offloop.run(release.wait, 30))
    await asyncio.sleep(0)  # the loop runs while the call blocks its thread
    assert not task.done()
    release.set()
    assert await task is True
    ident, running = await offloop.run(where)
    assert ident != threading.get_ident() and not running
    with pytest.raises(KeyError):
        await offloop.run(fail)


def test_in_fresh_thread_runs_enter_on_the_calls_thread() -> None:
    entered: list[int] = []
    ident, _ = offloop.in_fresh_thread(where, enter=lambda: entered.append(threading.get_ident()))
    assert entered == [ident] and ident != threading.get_ident()
    with pytest.raises(KeyError):
        offloop.in_fresh_thread(where, enter=fail)


async def test_a_worker_runs_calls_one_at_a_time_in_order() -> None:
    worker = offloop.Worker("test-worker")
    order: list[int] = []
    threads: set[int] = set()

    def step(i: int) -> int:
        threads.add(threading.get_ident())
        order.append(i)
        return i

    try:
        assert await asyncio.gather(*(worker.run(step, i) for i in range(20))) == list(range(20))
        assert order == list(range(20)) and len(threads) == 1 and threading.get_ident() not in threads
        with pytest.raises(KeyError):
            await worker.run(fail)
    finally:
        worker.close()
    with pytest.raises(RuntimeError):
        await worker.run(step, 1)
