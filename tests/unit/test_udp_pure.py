"""The UDP flow table, the GSO batcher and the UDP cmsgs as plain objects: no root, no
sockets, no clock."""

from __future__ import annotations

import dataclasses
import math
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portproxy.proxy.flowtable import FlowTable
from portproxy.proxy.gso import Batcher, segments
from portproxy.proxy.udpcmsg import IP_PKTINFO, IPV6_PKTINFO, SOL_UDP, UDP_GRO, UDP_SEGMENT, gro_size, reply_cmsg, \
    segment_cmsg
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


def _feed(datagrams: list, max_bytes: int, max_segments: int) -> list[Sent]:
    """Feed (flow, payload, batchable) datagrams, or (flow, [payloads], batchable) as one
    receive of a UDP_GRO run (every payload as long as the first, the last maybe shorter)."""
    sent: list[Sent] = []
    flows = {name: Flow(name) for name in "abc"}
    batcher: Batcher[Flow] = Batcher(lambda f, data, size, count: sent.append((f.name, bytes(data), size, count)),
                                     max_bytes=max_bytes, max_segments=max_segments)
    for name, payload, batchable in datagrams:
        run = payload if isinstance(payload, list) else [payload]
        data = b"".join(run)
        slot = batcher.slot()
        assert len(slot) >= 65535
        slot[:len(data)] = data
        if name == "c":  # a new flow: the caller cuts before opening it
            batcher.cut(len(data))
        batcher.add(flows[name], len(data), batchable, len(run[0]) if len(run) > 1 else 0)
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


gro_runs = st.tuples(st.integers(1, 300), st.integers(2, 9), st.integers(1, 300)).map(
    lambda t: [bytes([i]) * t[0] for i in range(t[1] - 1)] + [b"z" * min(t[0], t[2])])
"""A UDP_GRO receive: 2-9 datagrams of one size, the last maybe shorter."""

datagrams_and_runs = st.lists(
    st.tuples(st.sampled_from("abc"), st.one_of(st.binary(min_size=1, max_size=300), gro_runs), st.booleans()),
    max_size=60)


@settings(max_examples=400, deadline=None)
@given(grams=datagrams_and_runs, max_segments=st.integers(1, 8), max_bytes=st.integers(300, 2000))
def test_runs_give_back_every_datagram_in_order(grams: list, max_segments: int, max_bytes: int) -> None:
    """Splitting each run at its segment size gives back exactly the datagrams fed in, one
    by one or as received runs, in order and with their flows; every run obeys the GSO rules."""
    sent = _feed(grams, max_bytes, max_segments)
    back: list[tuple[str, bytes]] = []
    for flow, data, size, count in sent:
        pieces = [data[i:i + size] for i in range(0, len(data), size)]
        assert len(pieces) == count and all(len(p) == size for p in pieces[:-1]) and len(pieces[-1]) <= size
        assert count == 1 or (count <= max_segments and len(data) <= max_bytes)
        back += [(flow, p) for p in pieces]
    fed = [(name, p) for name, payload, _ in grams for p in (payload if isinstance(payload, list) else [payload])]
    assert back == fed
    unbatchable = [(name, p) for name, payload, batchable in grams if not batchable
                   for p in (payload if isinstance(payload, list) else [payload])]
    alone = [(flow, data) for flow, data, _, count in sent if count == 1]
    assert all(u in alone for u in unbatchable)


def test_a_received_run_joins_the_run_before_it() -> None:
    """Single reads and GRO reads of one flow and size make one GSO send, as if read one by one."""
    sent = _feed([("a", b"1" * 100, True), ("a", [b"2" * 100] * 5, True), ("a", [b"3" * 100] * 3 + [b"4" * 7], True),
                  ("a", b"5" * 100, True)], 65000, 64)
    assert [(f, size, count) for f, _, size, count in sent] == [("a", 100, 10), ("a", 100, 1)]


def test_a_received_run_larger_than_one_send_goes_in_whole_segments() -> None:
    sent = _feed([("a", [b"x" * 100] * 9 + [b"y" * 50], True)], max_bytes=450, max_segments=64)
    assert [(size, count, len(data)) for _, data, size, count in sent] == [(100, 4, 400), (100, 4, 400),
                                                                            (100, 2, 150)]
    sent = _feed([("a", [b"x" * 100] * 10, True)], max_bytes=65000, max_segments=3)
    assert [count for _, _, _, count in sent] == [3, 3, 3, 1]


def test_an_unbatchable_received_run_goes_datagram_by_datagram() -> None:
    sent = _feed([("a", [b"x" * 100] * 3 + [b"y" * 10], False)], 65000, 64)
    assert [(data, size, count) for _, data, size, count in sent] == [(b"x" * 100, 100, 1)] * 3 + [(b"y" * 10, 10, 1)]


@pytest.mark.parametrize("n, size, count", [(1, 0, 1), (1400, 0, 1), (1400, 1400, 1), (1400, 2000, 1),
                                            (2800, 1400, 2), (2801, 1400, 3), (65000, 1000, 65)])
def test_segments(n: int, size: int, count: int) -> None:
    assert segments(n, size) == count


# --- cmsgs ------------------------------------------------------------------------------------
def test_gro_size_from_the_kernels_cmsg() -> None:
    assert gro_size([]) == 0
    assert gro_size([(SOL_UDP, UDP_GRO, struct.pack("=i", 1400))]) == 1400
    pktinfo = (socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=i4s4s", 2, bytes(4), bytes(4)))
    assert gro_size([pktinfo, (SOL_UDP, UDP_GRO, struct.pack("=i", 1200))]) == 1200
    assert gro_size([pktinfo]) == 0
    assert gro_size([(SOL_UDP, UDP_SEGMENT, struct.pack("=H", 1400))]) == 0  # not what a receive says


def test_segment_cmsg() -> None:
    assert segment_cmsg(1400) == (SOL_UDP, UDP_SEGMENT, struct.pack("=H", 1400))


def test_reply_cmsg_from_pktinfo() -> None:
    v4 = struct.pack("=i4s4s", 7, socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.9"))
    # The reply leaves from the header's destination, on no interface in particular.
    assert reply_cmsg([(socket.IPPROTO_IP, IP_PKTINFO, v4)]) == [
        (socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, socket.inet_aton("10.0.0.9"), bytes(4)))]
    global6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    link6 = socket.inet_pton(socket.AF_INET6, "fe80::1")
    assert reply_cmsg([(socket.IPPROTO_IPV6, IPV6_PKTINFO, struct.pack("=16sI", global6, 3))]) == [
        (socket.IPPROTO_IPV6, IPV6_PKTINFO, struct.pack("=16sI", global6, 0))]
    assert reply_cmsg([(socket.IPPROTO_IPV6, IPV6_PKTINFO, struct.pack("=16sI", link6, 3))]) == [
        (socket.IPPROTO_IPV6, IPV6_PKTINFO, struct.pack("=16sI", link6, 3))]  # link-local keeps its interface
    assert reply_cmsg([(SOL_UDP, UDP_GRO, struct.pack("=i", 1400))]) == []
    assert reply_cmsg([(socket.IPPROTO_IP, IP_PKTINFO, b"short")]) == []


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
