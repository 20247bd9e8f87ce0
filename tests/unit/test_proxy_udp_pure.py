"""The UDP flow table and GSO batcher as plain objects: no root, no sockets, no clock."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portproxy.proxy.flowtable import FlowTable
from portproxy.proxy.gso import Batcher
from portproxy.proxy.options import ProxyOptions


@dataclasses.dataclass(eq=False)
class Flow:
    name: str
    last: float = 0.0


# --- flow table ------------------------------------------------------------------------------
def test_lookup_touch_expire() -> None:
    table: FlowTable[Flow] = FlowTable(max_flows=10, timeout=30)
    a, b = Flow("a"), Flow("b")
    table.add("a", a, now=0)
    table.add("b", b, now=10)
    assert table.get("a") is a and table.get("c") is None and len(table) == 2
    table.touch("a", now=20)
    assert [f.name for f in table] == ["b", "a"]  # least recently active first
    assert table.expire(now=39) == []
    assert table.expire(now=40) == [b]  # idle for exactly the timeout: gone
    assert table.expire(now=50) == [a]
    table.touch("a", now=60)  # a flow that is gone is ignored
    assert len(table) == 0


def test_full_table_evicts_the_least_recently_active() -> None:
    table: FlowTable[Flow] = FlowTable(max_flows=2, timeout=30)
    flows = [Flow(str(i)) for i in range(3)]
    assert table.evict_if_full() is None
    table.add("0", flows[0], now=0)
    table.add("1", flows[1], now=1)
    table.touch("0", now=2)
    assert table.evict_if_full() is flows[1]
    table.add("2", flows[2], now=3)
    assert [f.name for f in table] == ["0", "2"]
    assert table.clear() == [flows[0], flows[2]] and len(table) == 0


@pytest.mark.parametrize("max_flows, timeout", [(0, 1.0), (-1, 1.0), (1, 0.0), (1, -1.0), (1, math.nan)])
def test_table_refuses_limits_that_cannot_work(max_flows: int, timeout: float) -> None:
    with pytest.raises(ValueError):
        FlowTable(max_flows, timeout)


ops = st.lists(st.tuples(st.sampled_from(["add", "touch", "expire"]), st.integers(0, 7),
                         st.floats(0, 5, allow_nan=False)), max_size=80)


@settings(max_examples=300, deadline=None)
@given(max_flows=st.integers(1, 5), timeout=st.floats(0.5, 20), steps=ops)
def test_table_matches_a_list_model(max_flows: int, timeout: float, steps: list) -> None:
    """Against the obvious model: a list in least-recently-active order with times."""
    table: FlowTable[Flow] = FlowTable(max_flows, timeout)
    model: list[tuple[int, float]] = []
    now = 0.0
    for op, key, advance in steps:
        now += advance
        if op == "add" and table.get(key) is None:
            evicted = table.evict_if_full()
            if len(model) >= max_flows:
                assert evicted is not None and evicted.name == str(model.pop(0)[0])
            else:
                assert evicted is None
            table.add(key, Flow(str(key)), now)
            model.append((key, now))
        elif op == "touch":
            table.touch(key, now)
            found = [m for m in model if m[0] == key]
            if found:
                model.remove(found[0])
                model.append((key, now))
        elif op == "expire":
            gone = {int(f.name) for f in table.expire(now)}
            assert gone == {k for k, t in model if t <= now - timeout}
            model = [m for m in model if m[0] not in gone]
        assert [int(f.name) for f in table] == [k for k, _ in model]
        assert len(table) <= max_flows


# --- batcher ---------------------------------------------------------------------------------
Sent = tuple[str, bytes, int, int]


def _feed(datagrams: list[tuple[str, bytes, bool]], max_bytes: int, max_segments: int) -> list[Sent]:
    sent: list[Sent] = []
    flows = {name: Flow(name) for name in "abc"}
    batcher: Batcher[Flow] = Batcher(lambda f, data, size, count: sent.append((f.name, bytes(data), size, count)),
                                     max_bytes=max_bytes, max_segments=max_segments)
    for name, payload, batchable in datagrams:
        slot = batcher.slot()
        slot[:len(payload)] = payload
        if name == "c":  # a new flow: the caller cuts before opening it
            batcher.cut(len(payload))
        batcher.add(flows[name], len(payload), batchable)
    batcher.flush()
    return sent


def test_equal_sizes_of_one_flow_go_as_one_run() -> None:
    grams = [("a", bytes([i]) * 100, True) for i in range(5)] + [("a", b"x" * 40, True), ("a", b"y" * 100, True)]
    sent = _feed(grams, 65000, 64)
    assert [(f, size, count) for f, _, size, count in sent] == [("a", 100, 6), ("a", 100, 1)]
    assert sent[0][1] == b"".join(g[1] for g in grams[:6])


def test_a_run_ends_at_another_flow_a_larger_datagram_and_the_limits() -> None:
    sent = _feed([("a", b"1" * 10, True), ("b", b"2" * 10, True), ("b", b"3" * 20, True),
                  ("b", b"4" * 20, True), ("b", b"5" * 20, True), ("b", b"6" * 20, False)], max_bytes=45, max_segments=64)
    assert [(f, size, count) for f, _, size, count in sent] == [("a", 10, 1), ("b", 10, 1), ("b", 20, 2),
                                                                ("b", 20, 1), ("b", 20, 1)]


datagrams = st.lists(st.tuples(st.sampled_from("abc"), st.binary(min_size=1, max_size=300), st.booleans()),
                     max_size=60)


@settings(max_examples=300, deadline=None)
@given(grams=datagrams, max_segments=st.integers(1, 8), max_bytes=st.integers(300, 2000))
def test_runs_give_back_every_datagram_in_order(grams: list, max_segments: int, max_bytes: int) -> None:
    """Splitting each run at its segment size gives back exactly the datagrams fed in, in
    order and with their flows; every run obeys the GSO rules."""
    sent = _feed(grams, max_bytes, max_segments)
    back: list[tuple[str, bytes]] = []
    for flow, data, size, count in sent:
        pieces = [data[i:i + size] for i in range(0, len(data), size)]
        assert len(pieces) == count and all(len(p) == size for p in pieces[:-1]) and len(pieces[-1]) <= size
        assert count == 1 or (count <= max_segments and len(data) <= max_bytes)
        back += [(flow, p) for p in pieces]
    assert back == [(name, payload) for name, payload, _ in grams]
    unbatchable = [(name, payload) for name, payload, batchable in grams if not batchable]
    alone = [(flow, data) for flow, data, _, count in sent if count == 1]
    assert all(u in alone for u in unbatchable)


# --- options -----------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("udp_timeout", 0), ("udp_timeout", -1), ("udp_timeout", math.nan), ("udp_timeout", math.inf),
    ("max_udp_flows", 0), ("pipe_size", 0), ("pipe_size", 4095),
    ("connect_timeout", 0), ("connect_timeout", math.nan), ("connect_timeout", math.inf),
    ("drain_timeout", -1), ("drain_timeout", math.nan), ("listen_backlog", 0),
    ("target_rcvbuf", -1), ("notsent_lowat", -1),
])
def test_options_refuse_values_that_break_the_data_plane(field: str, value: float) -> None:
    with pytest.raises(ValueError) as caught:
        ProxyOptions(**{field: value})
    assert field in str(caught.value) and "\n" not in str(caught.value)


def test_default_options_are_valid() -> None:
    ProxyOptions()
    ProxyOptions(udp_timeout=0.1, max_udp_flows=1, pipe_size=4096, connect_timeout=0.01, drain_timeout=0)
