"""The UDP relay's own work per datagram, without the scheduler's noise: a UdpListener
run in this process (host namespace of a fresh topology) drains queued bursts.

    .venv/bin/python benchmarks/udp_burst.py TREE [BURST] [forward|both|rr]

TREE is the portproxy source tree to measure (A/B of two checkouts). Ten bursts of BURST
1400-byte datagrams are queued on the listening socket (forward: client → target), and
with ``both`` also on the flow's socket (reverse: target → client), then the listener's
read callbacks drain them. Prints the thread's CPU time (user + system, the kernel's
delivery to the receiving socket included) per datagram relayed. Under
``valgrind --tool=callgrind`` the difference of two BURST sizes gives user-space
instructions per datagram, a figure that does not move with the machine's load. ``rr``:
20 × BURST round trips of one 64-byte datagram each way, the proxy's CPU per round trip.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time

SO_RCVBUFFORCE = 33
SIZE = 1400


def _cpu() -> float:
    """This thread's CPU time, to the nanosecond (CLOCK_THREAD_CPUTIME_ID), not in ticks."""
    return time.thread_time()


def main() -> int:
    tree = sys.argv[1]
    burst = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    mode = sys.argv[3] if len(sys.argv) > 3 else "both"
    directions = {"forward": ["forward"], "rr": ["rr"]}.get(mode, ["forward", "reverse"])
    sys.path.insert(0, tree)
    try:
        from portproxy.lab.topology import demo_topology
    except ImportError:  # a tree from before portproxy.lab: the same topology, its older name
        from portproxy.netns import seed_topology as demo_topology
    from portproxy.proxy import udp
    from portproxy.proxy.options import ProxyOptions
    from portproxy.proxy.poller import Poller

    def inside(topo) -> dict:
        loop = asyncio.new_event_loop()
        lsock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        lsock.bind(("0.0.0.0", 7000))
        sink = topo.container.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
        sink.bind(("0.0.0.0", 7000))
        sink.setblocking(False)
        client = topo.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
        client.connect((topo.host_ip, 7000))
        client.setblocking(False)
        listener = udp.UdpListener(loop, lsock, (topo.container_ip, 7000), "burst", ProxyOptions(), Poller(loop))
        listener.serve()
        loop.remove_reader(lsock.fileno())  # the callbacks are called here, not by the loop
        # The same room for a burst in every tree measured: what is compared is the work.
        lsock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
        payload = b"x" * SIZE
        buf = bytearray(65536)

        def drain(s: socket.socket) -> int:
            k = 0
            while True:
                try:
                    s.recv_into(buf)
                except BlockingIOError:
                    return k
                k += 1

        results = {}
        if directions == ["rr"]:
            client.send(b"open")  # the flow
            listener._on_readable()
            drain(sink)
            flow = next(iter(listener.flows))
            port = flow.sock.getsockname()[1]
            request = b"r" * 64
            there = back = 0.0
            rounds = 20 * burst
            for _ in range(rounds):
                client.send(request)
                c0 = _cpu()
                listener._on_readable()
                there += _cpu() - c0
                drain(sink)
                sink.sendto(request, (topo.bridge_ip, port))
                c0 = _cpu()
                flow.on_readable()
                back += _cpu() - c0
                drain(client)
            results["rr"] = {"round_trips": rounds,
                             "cpu_us_per_round_trip": round(1e6 * (there + back) / rounds, 2),
                             "to_target_us": round(1e6 * there / rounds, 2),
                             "to_client_us": round(1e6 * back / rounds, 2)}
        for direction in directions if directions != ["rr"] else []:
            cpu = 0.0
            total = 0
            for _ in range(10):
                if direction == "forward":
                    for _ in range(burst):
                        client.send(payload)
                    time.sleep(0.02)
                    c0 = _cpu()
                    while True:
                        before = listener.stats.datagrams_to_target
                        listener._on_readable()
                        if listener.stats.datagrams_to_target == before:
                            break
                    cpu += _cpu() - c0
                    total += drain(sink)
                else:
                    flow = next(iter(listener.flows))
                    flow.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
                    port = flow.sock.getsockname()[1]
                    for _ in range(burst):
                        sink.sendto(payload, (topo.bridge_ip, port))
                    time.sleep(0.02)
                    c0 = _cpu()
                    while True:
                        before = listener.stats.datagrams_to_client
                        flow.on_readable()
                        if listener.stats.datagrams_to_client == before:
                            break
                    cpu += _cpu() - c0
                    total += drain(client)
            results[direction] = {"relayed": total, "cpu_us_per_datagram": round(1e6 * cpu / max(total, 1), 2)}
        results["send_errors"] = dict(listener.stats.send_errors)
        return results

    with demo_topology("ppburst") as topo:
        print(topo.host.run(inside, topo))
    return 0


if __name__ == "__main__":
    sys.exit(main())
