"""UDP through the userland proxy: per-client flows, replies from the right address, expiry, eviction."""

from __future__ import annotations

import asyncio
import os
import signal

from tests.support.traffic import check_udp_backend_appears_later, udp_endpoint


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
