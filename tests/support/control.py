"""Talking to a ``portproxy serve`` under test: its CLI, its API socket, its metrics, and waiting."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

from tests.support.traffic import open_connection


def ls(cli) -> dict[str, dict]:
    result = cli("ls", "--json")
    assert result.returncode == 0, result.stderr
    return {m["spec"]: m for m in json.loads(result.stdout)["mappings"]}


async def roundtrip(topo, port: int, host: str | None = None) -> None:
    reader, writer = await open_connection(topo.client, host or topo.host_ip, port)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
    writer.close()


async def wait_for(predicate, timeout: float = 15, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(predicate):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def metrics_text(topo, port: int = 9779) -> str:
    def get() -> str:
        sock = topo.host.socket()
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        sock.close()
        return b"".join(chunks).decode()
    return get()


def curl(sock, *args: str, path: str = "/v1/mappings") -> tuple[int, dict]:
    out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", "--unix-socket", str(sock), *args,
                          f"http://portproxy{path}"], capture_output=True, text=True, timeout=20)
    body, _, status = out.stdout.rpartition("\n")
    return int(status), json.loads(body)
