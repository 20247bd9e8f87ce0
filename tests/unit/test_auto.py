"""The auto mode's policy as tables: samples in, moves out (no root, no sockets, no clock)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from portproxy.controller.auto import COOL, HOT, AutoPolicy, AutoThresholds, Sample

T = AutoThresholds(bytes_per_second=1000, connections_per_second=10, hot_after=1.0, cool_after=60.0)


def feed(policy: AutoPolicy, rates: list[tuple[float, float]], step: float = 0.5, start: float = 0.0):
    """Feed samples ``step`` seconds apart whose deltas give ``rates`` (bytes/s, conn/s);
    apply every move the policy asks for; return the times of the moves."""
    moves = []
    total_bytes = total_conns = 0.0
    t = start
    if policy.last is None:
        policy.observe(Sample(t, 0, 0))
    else:
        t, total_bytes, total_conns = policy.last.time, policy.last.bytes, policy.last.connections
    for bps, cps in rates:
        t += step
        total_bytes += bps * step
        total_conns += cps * step
        place = policy.observe(Sample(t, int(total_bytes), int(total_conns)))
        if place is not None:
            policy.moved(place)
            moves.append((t, place))
    return moves


def test_light_traffic_never_moves():
    policy = AutoPolicy(T)
    assert feed(policy, [(999, 9)] * 1000) == []
    assert policy.place == COOL and policy.moves == 0


def test_bytes_above_the_threshold_for_hot_after_move_it_to_the_kernel():
    policy = AutoPolicy(T)
    assert feed(policy, [(2000, 0)] * 4) == [(1.0, HOT)]
    assert policy.place == HOT and policy.moves == 1


def test_connections_alone_move_it_too():
    policy = AutoPolicy(T)
    assert feed(policy, [(0, 20)] * 4) == [(1.0, HOT)]


def test_a_burst_shorter_than_hot_after_does_not_move_it():
    policy = AutoPolicy(T)
    assert feed(policy, [(5000, 50), (0, 0)] * 100) == []


def test_it_moves_back_only_after_a_cool_minute():
    policy = AutoPolicy(T)
    feed(policy, [(2000, 0)] * 2)
    assert policy.place == HOT
    # Below half of both thresholds: back after 60 s, not before.
    moves = feed(policy, [(400, 4)] * 130)
    assert moves == [(61.0, COOL)]


def test_load_between_half_and_the_threshold_keeps_it_in_the_kernel():
    policy = AutoPolicy(T)
    feed(policy, [(2000, 0)] * 2)
    assert feed(policy, [(600, 0)] * 1000) == []  # hysteresis: no flapping at the edge
    assert policy.place == HOT


def test_a_busy_moment_restarts_the_cool_minute():
    policy = AutoPolicy(T)
    feed(policy, [(2000, 0)] * 2)
    moves = feed(policy, [(0, 0)] * 100 + [(900, 0)] + [(0, 0)] * 130)
    # Cool from 1.0 to 51.0, busy at 51.5, cool again from 51.5: back at 111.5.
    assert moves == [(111.5, COOL)]


def test_a_counter_going_backwards_restarts_the_measurement():
    policy = AutoPolicy(T)
    policy.observe(Sample(0, 10_000, 100))
    assert policy.observe(Sample(0.5, 0, 0)) is None  # replaced mapping: not negative load
    assert policy.load is None


def test_a_failed_move_is_asked_again():
    policy = AutoPolicy(T)
    policy.observe(Sample(0, 0, 0))
    policy.observe(Sample(0.5, 1000, 0))
    assert policy.observe(Sample(1.0, 2000, 0)) == HOT
    # The switch failed: moved() not called; the next sample asks again.
    assert policy.observe(Sample(1.5, 3000, 0)) == HOT
    policy.moved(HOT)
    assert policy.observe(Sample(2.0, 4000, 0)) is None


@given(st.lists(st.tuples(st.floats(0, 1e4), st.floats(0, 100)), max_size=300))
def test_moves_alternate_and_are_never_closer_than_hot_after(rates):
    policy = AutoPolicy(T)
    moves = feed(policy, rates)
    places = [place for _, place in moves]
    assert places == [HOT, COOL] * (len(places) // 2) + [HOT] * (len(places) % 2)
    times = [t for t, _ in moves]
    assert all(b - a >= T.hot_after for a, b in zip(times, times[1:]))
