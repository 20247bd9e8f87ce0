"""``portproxy map --mode auto``: the mapping moves itself to DNAT under load and back, live."""

from __future__ import annotations

import asyncio
import hashlib
import os

from tests.support.control import wait_for
from tests.support.nft import tables
from tests.support.traffic import open_connection


async def _stream(topo, port: int, seconds: float) -> tuple[int, bool]:
    """Echo random chunks for ``seconds``: (bytes echoed, all intact)."""
    reader, writer = await open_connection(topo.client, topo.host_ip, port)
    sent, received = hashlib.sha256(), hashlib.sha256()
    total = 0
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        chunk = os.urandom(16384)
        sent.update(chunk)
        writer.write(chunk)
        await writer.drain()
        received.update(await asyncio.wait_for(reader.readexactly(len(chunk)), 20))
        total += len(chunk)
    writer.write_eof()
    rest = await asyncio.wait_for(reader.read(), 20)
    writer.close()
    return total, sent.digest() == received.digest() and rest == b""


async def test_map_auto_moves_under_load_and_back(topo, tcp_echo, portproxy) -> None:
    proxy = portproxy("map", f"9090:{topo.container_ip}:8080", "--mode", "auto", "--auto-bytes-per-second", "100000",
                      "--auto-cool-seconds", "2")
    assert proxy.ready[0].endswith("(auto)"), proxy.ready
    assert ("inet", "portproxy") not in tables(topo.host)  # light: no nft table yet

    def moved(to: str) -> bool:
        return any(f"to {to}" in line and "auto: moved" in line for line in proxy.stderr_lines)

    streams = [asyncio.create_task(_stream(topo, 9090, 6)) for _ in range(4)]
    await wait_for(lambda: moved("hybrid"), timeout=30, what="the move to the kernel path")
    assert ("inet", "portproxy") in tables(topo.host)
    late = await _stream(topo, 9090, 1)  # translated by the DNAT now
    results = [*await asyncio.gather(*streams), late]
    assert all(intact for _, intact in results), results  # every stream, across the move
    await wait_for(lambda: moved("userland"), timeout=30, what="the move back")
    assert (await _stream(topo, 9090, 0.5))[1]
    assert proxy.stop() == 0
    assert ("inet", "portproxy") not in tables(topo.host)  # the table goes with the process
