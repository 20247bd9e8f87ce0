"""UDP through the userland proxy: per-client flows, replies from the right address, expiry, eviction."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

from tests.support.metrics import sample, scrape
from tests.support.traffic import check_udp_backend_appears_later, udp_endpoint

from portproxy.proxy.udpcmsg import segment_cmsg


async def _whoami(client, host: str, port: int) -> str:
    client.transport.sendto(b"whoami", (host, port))
    data, _ = await client.recv()
    return data.decode()


async def test_two_clients_get_their_own_replies(topo, udp_echo, portproxy) -> None:
    proxy = portproxy("map", f"5353:{topo.container_ip}:5353/udp")
    assert proxy.ready == [f"ready udp 0.0.0.0:5353 -> {topo.container_ip}:5353"]
    a = await udp_endpoint(topo.client)
    b = await udp_endpoint(topo.client)
    for i in range(20):
        a.transport.sendto(b"a%d" % i, (topo.host_ip, 5353))
        b.transport.sendto(b"b%d" % i, (topo.host_ip, 5353))
        data_a, from_a = await a.recv()
        data_b, from_b = await b.recv()
        assert (data_a, data_b) == (b"a%d" % i, b"b%d" % i)
        # The reply comes from the address the client sent to, on a wildcard listener.
        assert from_a == (topo.host_ip, 5353) and from_b == (topo.host_ip, 5353)
    # Each client is its own flow, seen by the target from the host's bridge address.
    who_a, who_b = await _whoami(a, topo.host_ip, 5353), await _whoami(b, topo.host_ip, 5353)
    assert who_a.split()[0] == who_b.split()[0] == topo.bridge_ip
    assert who_a != who_b


async def test_max_size_datagram(topo, udp_echo, portproxy) -> None:
    portproxy("map", f"5353:{topo.container_ip}:5353/udp")
    client = await udp_endpoint(topo.client)
    payload = os.urandom(65507)
    client.transport.sendto(payload, (topo.host_ip, 5353))
    data, _ = await client.recv()
    assert data == payload


async def test_ipv6(topo, udp_echo, portproxy) -> None:
    portproxy("map", f"5353:[{topo.container_ip6}]:5353/udp")
    client = await udp_endpoint(topo.client, "::")
    client.transport.sendto(b"over v6", (topo.host_ip6, 5353))
    data, addr = await client.recv()
    assert data == b"over v6" and addr[:2] == (topo.host_ip6, 5353)


async def test_reply_leaves_from_the_address_it_was_sent_to(topo, udp_echo, portproxy) -> None:
    """The host has two addresses the client can reach; each reply uses the one that was asked."""
    portproxy("map", f"5353:{topo.container_ip}:5353/udp")
    client = await udp_endpoint(topo.host)
    for addr in (topo.host_ip, topo.bridge_ip, "127.0.0.1"):
        client.transport.sendto(b"x", (addr, 5353))
        _, source = await client.recv()
        assert source == (addr, 5353)


async def test_idle_flow_expires(topo, udp_echo, portproxy) -> None:
    portproxy("map", f"5353:{topo.container_ip}:5353/udp", "--udp-timeout", "1")
    client = await udp_endpoint(topo.client)
    first = await _whoami(client, topo.host_ip, 5353)
    await asyncio.sleep(0.3)
    assert await _whoami(client, topo.host_ip, 5353) == first  # same flow while active
    await asyncio.sleep(2.5)
    assert await _whoami(client, topo.host_ip, 5353) != first  # a new flow after the timeout


async def test_one_sided_flow_keeps_its_source_port(topo, portproxy) -> None:
    """Traffic only towards the target still keeps the flow (and its source port) alive."""
    sink = await udp_endpoint(topo.container, port=5354)
    portproxy("map", f"5354:{topo.container_ip}:5354/udp", "--udp-timeout", "1.5")
    client = await udp_endpoint(topo.client)
    ports = set()
    for _ in range(8):
        client.transport.sendto(b"ping", (topo.host_ip, 5354))
        _, source = await sink.recv()
        ports.add(source[1])
        await asyncio.sleep(0.4)
    assert len(ports) == 1


async def test_table_is_bounded_oldest_evicted(topo, udp_echo, portproxy) -> None:
    portproxy("map", f"5353:{topo.container_ip}:5353/udp", "--max-udp-flows", "2")
    clients = [await udp_endpoint(topo.client) for _ in range(3)]
    first = [await _whoami(c, topo.host_ip, 5353) for c in clients[:2]]
    await _whoami(clients[2], topo.host_ip, 5353)  # evicts clients[0]'s flow, the oldest
    assert await _whoami(clients[1], topo.host_ip, 5353) == first[1]
    assert await _whoami(clients[0], topo.host_ip, 5353) != first[0]


async def test_no_backend_at_first_then_it_appears(topo, portproxy) -> None:
    """ICMP port unreachable from the target does not kill the flow or the proxy."""
    proxy = portproxy("map", f"5355:{topo.container_ip}:5355/udp")
    await check_udp_backend_appears_later(topo, 5355, 5355)
    assert proxy.proc.poll() is None


async def test_queued_datagrams_keep_their_boundaries_and_order(topo, portproxy) -> None:
    """Datagrams that queue up while the proxy is not running go out in UDP GSO batches
    (runs of equal size per flow, a shorter one ending a run); the target must still get
    every datagram whole, on its own, in each client's order."""
    sink = await udp_endpoint(topo.container, port=5355)
    proxy = portproxy("map", f"5355:{topo.container_ip}:5355/udp")
    clients = [await udp_endpoint(topo.client), await udp_endpoint(topo.client)]
    for client in clients:  # open both flows first
        client.transport.sendto(b"hello", (topo.host_ip, 5355))
        await sink.recv()
    sizes = [1000] * 20 + [300] + [1200] * 8 + [1] + [1400] * 6
    sent: list[list[bytes]] = [[], []]

    def send(c: int, size: int) -> None:
        payload = (b"%d:%03d:" % (c, len(sent[c])) + os.urandom(size))[:size]
        clients[c].transport.sendto(payload, (topo.host_ip, 5355))
        sent[c].append(payload)

    proxy.proc.send_signal(signal.SIGSTOP)
    try:
        for c in (0, 1):  # runs of one flow: batched
            for size in sizes:
                send(c, size)
            await asyncio.sleep(0.05)
        for size in sizes[:10]:  # the two flows interleaved: each switch ends a batch
            send(0, size)
            send(1, size)
        await asyncio.sleep(0.2)
    finally:
        proxy.proc.send_signal(signal.SIGCONT)
    received: dict[int, list[bytes]] = {}
    for _ in range(len(sent[0]) + len(sent[1])):
        data, source = await sink.recv()
        received.setdefault(source[1], []).append(data)
    assert sorted(received.values()) == sorted(sent)


def _gso_send(sock: socket.socket, grams: list[bytes], to: tuple | None = None) -> None:
    """One send of a run of equal-sized datagrams (the last may be shorter), as QUIC stacks send."""
    cmsg = [segment_cmsg(len(grams[0]))] if len(grams) > 1 else []
    if to is None:
        sock.sendmsg([b"".join(grams)], cmsg)
    else:
        sock.sendmsg([b"".join(grams)], cmsg, 0, to)


def _numbered(tag: bytes, start: int, size: int, count: int, last: int | None = None) -> list[bytes]:
    grams = [(tag + b"%04d:" % (start + i) + os.urandom(size))[:size] for i in range(count)]
    if last is not None:
        grams[-1] = grams[-1][:last]
    return grams


def test_gso_runs_both_ways_arrive_whole_in_order_and_counted(topo, portproxy) -> None:
    """A sender's GSO runs reach the proxy coalesced (its sockets take UDP_GRO) and leave
    it as runs again, both ways: every datagram still arrives on its own, whole, in order,
    and the counters count datagrams, not receives."""
    server = topo.container.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("0.0.0.0", 5356))
    server.settimeout(5)
    portproxy("map", f"5356:{topo.container_ip}:5356/udp", "--metrics-addr")
    client = topo.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(5)
    client.connect((topo.host_ip, 5356))
    runs = [_numbered(b"c", 0, 1000, 20), _numbered(b"c", 20, 1200, 8, last=500), _numbered(b"c", 28, 1400, 1),
            _numbered(b"c", 29, 1200, 44)]
    for run in runs:
        _gso_send(client, run)
    sent = [g for run in runs for g in run]
    got = [server.recvfrom(65535) for _ in sent]
    assert [data for data, _ in got] == sent
    flow = got[0][1]
    assert {source for _, source in got} == {flow}  # one flow

    replies = [_numbered(b"s", 0, 1100, 30), _numbered(b"s", 30, 1100, 5, last=3), _numbered(b"s", 35, 700, 64)]
    for run in replies:
        _gso_send(server, run, flow)
    back = [g for run in replies for g in run]
    received = [client.recvfrom(65535) for _ in back]
    assert [data for data, _ in received] == back
    assert {source for _, source in received} == {(topo.host_ip, 5356)}

    text = scrape(topo.host)
    udp = {"proto": "udp", "listen": "*:5356", "target": f"{topo.container_ip}:5356"}
    assert sample(text, "portproxy_udp_datagrams_total", direction="to_target", **udp) == len(sent)
    assert sample(text, "portproxy_udp_datagrams_total", direction="to_client", **udp) == len(back)
    assert sample(text, "portproxy_bytes_total", direction="to_target", path="userland", **udp) == sum(map(len, sent))
    assert sample(text, "portproxy_bytes_total", direction="to_client", path="userland", **udp) == sum(map(len, back))
    assert sample(text, "portproxy_udp_flows_total", event="created", **udp) == 1


def test_reply_runs_wider_than_the_clients_route_still_arrive(topo, portproxy) -> None:
    """A reply run whose datagrams do not fit the route back to the client unfragmented
    cannot go out as one GSO send; each datagram goes alone (fragmented) and arrives whole."""
    with topo.host.netlink() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="vout")[0], mtu=1280)
    with topo.client.netlink() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="eth0")[0], mtu=1280)
    server = topo.container.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("0.0.0.0", 5356))
    server.settimeout(5)
    portproxy("map", f"5356:{topo.container_ip}:5356/udp", "--metrics-addr")
    client = topo.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(5)
    client.connect((topo.host_ip, 5356))
    client.send(b"hello")
    _, flow = server.recvfrom(100)
    for _ in range(2):  # the second run: the flow knows the limit already
        run = _numbered(b"s", 0, 1400, 10) + _numbered(b"t", 0, 200, 3)
        _gso_send(server, run[:10], flow)
        _gso_send(server, run[10:], flow)
        assert [client.recv(65535) for _ in run] == run
    udp = {"proto": "udp", "listen": "*:5356", "target": f"{topo.container_ip}:5356"}
    assert sample(scrape(topo.host), "portproxy_udp_datagrams_total", direction="to_client", **udp) == 26


def test_runs_to_a_target_whose_route_narrowed_still_arrive(topo, portproxy) -> None:
    """The route to the target gets a smaller MTU after the flow was opened: its GSO runs
    are refused, and each datagram goes alone (fragmented) and arrives whole."""
    server = topo.container.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("0.0.0.0", 5356))
    server.settimeout(5)
    portproxy("map", f"5356:{topo.container_ip}:5356/udp")
    client = topo.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(5)
    client.connect((topo.host_ip, 5356))
    client.send(b"hello")
    server.recvfrom(100)
    with topo.host.netlink() as ipr:
        for dev in (topo.bridge, topo.container_port):
            ipr.link("set", index=ipr.link_lookup(ifname=dev)[0], mtu=1280)
    with topo.container.netlink() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="eth0")[0], mtu=1280)
    for _ in range(2):
        run = _numbered(b"c", 0, 1400, 10)
        _gso_send(client, run)
        assert [server.recv(65535) for _ in run] == run
