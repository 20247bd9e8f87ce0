"""A client that never reads cannot make the proxy's target socket buffer megabytes.

In-process server (see test_proxy_ports.run_in_host); the buffers are read back with
getsockopt from the relay's own sockets, no timing involved. What this saves in
kernel memory is a benchmark figure (``portproxy bench``: slow readers).
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import socket
import termios

from tests.support.traffic import open_connection, start_server
from portproxy.lab.topology import DemoTopology
from portproxy.proxy import ProxyOptions, ProxyServer
from portproxy.proxy.tcp import TCP_NOTSENT_LOWAT, TcpListener, TcpRelay
from portproxy.spec import parse_spec
from tests.support.inprocess import run_in_host

OPTIONS = ProxyOptions(drain_timeout=1, target_rcvbuf=32 * 1024, notsent_lowat=16 * 1024)


def _queued(sock: socket.socket) -> int:
    count = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, count)
    return count[0]


def test_target_buffer_stays_small_until_the_client_reads(topo: DemoTopology) -> None:
    mapping = parse_spec(f"0.0.0.0:9360:{topo.container_ip}:8090")

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(128):  # 8 MiB, as fast as it is taken
                writer.write(bytes(1 << 16))
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    async def body(server: ProxyServer) -> None:
        target = await start_server(topo.container, 8090, firehose)
        try:
            server.add(mapping)
            listener = server.listeners[mapping][0]
            assert isinstance(listener, TcpListener)
            stalled = topo.client.socket()  # a plain socket: asyncio streams would read ahead
            stalled.settimeout(5)
            stalled.connect((topo.host_ip, 9360))
            reading = await open_connection(topo.client, topo.host_ip, 9360)
            await reading[0].readexactly(4 << 20)  # a reader: it takes 4 MiB

            def relay_of(port: int) -> TcpRelay:
                return next(r for r in listener.connections if r.client.getpeername()[1] == port)

            slow = relay_of(stalled.getsockname()[1])
            fast = relay_of(reading[1].get_extra_info("sockname")[1])
            assert slow.upstream is not None and fast.upstream is not None
            # The kernel doubles what SO_RCVBUF is given.
            assert slow.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * OPTIONS.target_rcvbuf
            assert _queued(slow.upstream) <= 2 * OPTIONS.target_rcvbuf
            assert slow.client.getsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT) == OPTIONS.notsent_lowat
            # The reader proved itself: its target socket may buffer as autotuning would.
            assert fast.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) > 1 << 20
            while await reading[0].read(1 << 20):
                pass  # the rest arrives intact
            stalled.close()
            reading[1].close()
        finally:
            target.close()

    run_in_host(topo, body, OPTIONS)
