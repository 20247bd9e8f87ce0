"""The failed-connect log throttle: pure logic, no sockets, no clock."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from portproxy.proxy.throttle import LogThrottle, summary_text


def test_first_occurrence_is_written_at_once() -> None:
    t = LogThrottle(10.0)
    assert t.admit(100.0, "ECONNREFUSED")
    assert t.due == 110.0


def test_later_ones_are_held_and_summarised_by_reason() -> None:
    t = LogThrottle(10.0)
    assert t.admit(0.0, "ECONNREFUSED")
    assert not t.admit(1.0, "ECONNREFUSED")
    assert not t.admit(2.0, "timeout")
    assert not t.admit(3.0, "ECONNREFUSED")
    assert t.held == 3
    assert t.summary(10.0) == {"ECONNREFUSED": 2, "timeout": 1}
    assert t.held == 0
    assert t.due == 20.0  # the summary was a line: the next window starts with it
    assert not t.admit(11.0, "ECONNREFUSED")


def test_a_quiet_window_closes_and_the_next_one_is_written_at_once() -> None:
    t = LogThrottle(10.0)
    assert t.admit(0.0, "timeout")
    assert t.summary(10.0) == {}
    assert t.due is None
    assert t.admit(500.0, "timeout")


def test_summary_text() -> None:
    assert summary_text({"timeout": 2, "ECONNREFUSED": 10, "EHOSTUNREACH": 2}, 10.0) == \
        "14 more in the last 10s (ECONNREFUSED 10, EHOSTUNREACH 2, timeout 2)"
    assert summary_text({"timeout": 1}, 3.14159) == "1 more in the last 3.1s (timeout 1)"


@given(st.lists(st.tuples(st.floats(0, 5), st.sampled_from(["a", "b", "c"])), max_size=200))
def test_every_occurrence_is_written_or_counted_once_and_lines_are_spaced(events: list) -> None:
    """Whatever the arrivals: written + summarised == occurrences, and no two lines are
    closer than the interval (the caller calls summary() exactly when due)."""
    t = LogThrottle(10.0)
    now, written, summarised, lines = 0.0, 0, 0, []
    for gap, reason in events:
        now += gap
        while t.due is not None and t.due <= now:
            at = t.due
            held = t.summary(at)
            if held:
                summarised += sum(held.values())
                lines.append(at)
        if t.admit(now, reason):
            written += 1
            lines.append(now)
    while t.due is not None:
        at = t.due
        held = t.summary(at)
        if held:
            summarised += sum(held.values())
            lines.append(at)
    assert written + summarised == len(events)
    assert all(b - a >= 10.0 - 1e-9 for a, b in zip(lines, lines[1:]))
