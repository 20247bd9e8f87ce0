"""Servers and clients on the test's own event loop, with sockets made inside namespaces."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from pathlib import Path
from typing import Callable

from portproxy.lab.namespaces import Namespace
from portproxy.lab.topology import DemoTopology


def family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


async def open_connection(ns: Namespace, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio streams over a TCP connection made from inside ``ns``."""
    sock = ns.socket(family_of(host), socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)), 10)
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock, limit=1 << 20)


async def echo_roundtrip(ns: Namespace, host: str, port: int, payload: bytes, timeout: float = 60) -> bytes:
    """Send ``payload`` (then EOF) over a new connection from ``ns``; return all that comes back."""
    reader, writer = await open_connection(ns, host, port)

    async def send() -> None:
        view = memoryview(payload)
        for i in range(0, len(view), 1 << 16):
            writer.write(view[i : i + (1 << 16)])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    try:
        return await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        await sender
        writer.close()


async def expect_closed_by_peer(reader: asyncio.StreamReader, timeout: float) -> None:
    """Wait until the peer resets or closes the connection without sending anything."""
    try:
        data = await asyncio.wait_for(reader.read(1), timeout)
    except ConnectionResetError:
        return
    assert data == b"", "the peer sent data instead of closing"


async def connect_expecting_close(ns: Namespace, host: str, port: int, timeout: float) -> None:
    """Connect from ``ns`` and wait until the peer resets or closes without sending anything.

    A proxy that resets the client at once (its target refused) may do so before the
    client's event loop has even seen its own connect complete: then connect() itself
    reports the reset, which is the same outcome."""
    try:
        reader, writer = await open_connection(ns, host, port)
    except ConnectionResetError:
        return
    try:
        await expect_closed_by_peer(reader, timeout)
    finally:
        writer.close()


def congestion_control_choice(ns: Namespace) -> tuple[str, str]:
    """(the namespace's default TCP congestion control, another one this kernel has)."""
    default = ns.run(lambda: Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip())
    return default, ("cubic" if default != "cubic" else "reno")


def _congestion_controls(ns: Namespace, ss_filter: str, known: set[str]) -> list[str]:
    """The congestion control (one of ``known``) of each established socket matching an ``ss`` filter."""
    proc = ns.popen(["ss", "-tinH", "state", "established", *ss_filter.split()], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=10)
    return [word for word in out.split() if word in known]


async def check_congestion_control_per_leg(topo: DemoTopology, host_port: int, target_port: int, default: str,
                                           chosen: str) -> None:
    """Through a proxy on ``host_port``: the connection to the target uses ``chosen``, the
    client's connection keeps the namespace's ``default``."""
    reader, writer = await open_connection(topo.client, topo.host_ip, host_port)
    try:
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
        known = {default, chosen}
        assert _congestion_controls(topo.host, f"dst {topo.container_ip}:{target_port}", known) == [chosen]
        assert _congestion_controls(topo.host, f"sport = :{host_port}", known) == [default]
    finally:
        writer.close()


async def start_server(ns: Namespace, port: int, handler: Callable, host: str = "0.0.0.0") -> asyncio.Server:
    """An asyncio stream server listening inside ``ns``."""
    sock = ns.socket(family_of(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if ":" in host:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return await asyncio.start_server(handler, sock=sock, limit=1 << 20)


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF, then half-close back."""
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


class UdpEndpoint(asyncio.DatagramProtocol):
    """A datagram socket inside a namespace with a queue of what it receives."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.queue.put_nowait((data, addr))

    def error_received(self, exc: Exception) -> None:
        pass

    async def recv(self, timeout: float = 5.0) -> tuple[bytes, tuple]:
        return await asyncio.wait_for(self.queue.get(), timeout)


async def udp_endpoint(ns: Namespace, host: str = "0.0.0.0", port: int = 0) -> UdpEndpoint:
    sock = ns.socket(family_of(host), socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((host, port))
    sock.setblocking(False)
    _, proto = await asyncio.get_running_loop().create_datagram_endpoint(UdpEndpoint, sock=sock)
    return proto


class UdpEchoServer(asyncio.DatagramProtocol):
    """Echoes each datagram; a datagram b"whoami" gets the sender's "ip port" instead."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if data == b"whoami":
            self.transport.sendto(f"{addr[0]} {addr[1]}".encode(), addr)
        else:
            self.transport.sendto(data, addr)


async def start_udp_echo(ns: Namespace, port: int, host: str = "0.0.0.0") -> asyncio.DatagramTransport:
    sock = ns.socket(family_of(host), socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    if ":" in host:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    sock.setblocking(False)
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(UdpEchoServer, sock=sock)
    return transport


async def check_udp_backend_appears_later(topo, host_port: int, target_port: int) -> None:
    """Datagrams sent while nothing listens at the target draw ICMP errors; once a server
    appears, the same client's next datagram gets through (the flow survived)."""
    client = await udp_endpoint(topo.client)
    for _ in range(3):
        client.transport.sendto(b"anyone?", (topo.host_ip, host_port))
        await asyncio.sleep(0.1)
    server = await start_udp_echo(topo.container, target_port)
    try:
        client.transport.sendto(b"now", (topo.host_ip, host_port))
        # A proxy that reports ready before it reads (the drop-in's lean start) may still
        # forward an "anyone?" that waited in its socket: skip those, "now" must follow.
        while (data := (await client.recv())[0]) == b"anyone?":
            pass
        assert data == b"now"
    finally:
        server.close()
