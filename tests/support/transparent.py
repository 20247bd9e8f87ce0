"""Transparent mode as the target sees it: who connected, and what the host namespace holds."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess

from tests.support.traffic import open_connection


async def peer_reporter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Say the peer's "ip port" as the container sees it, then close."""
    ip, port = writer.get_extra_info("peername")[:2]
    writer.write(f"{ip} {port}".encode())
    await writer.drain()
    writer.close()


async def seen_by_target(ns, host: str, port: int) -> tuple[str, int, tuple]:
    """Connect from ``ns``; return what the target saw and our own local address."""
    reader, writer = await open_connection(ns, host, port)
    local = writer.get_extra_info("sockname")
    try:
        ip, seen_port = (await asyncio.wait_for(reader.read(-1), 10)).decode().split()
    finally:
        writer.close()
    return ip, int(seen_port), local


def host_state(topo, table: int = 7719) -> dict:
    """The host namespace's rules and routes that point at ``table``, and its nft tables."""

    def read() -> dict:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            rules = [r.get_attr("FRA_PRIORITY") for fam in (socket.AF_INET, socket.AF_INET6)
                     for r in ipr.get_rules(family=fam) if r.get_attr("FRA_TABLE") == table]
            routes = [r["family"] for fam in (socket.AF_INET, socket.AF_INET6)
                      for r in ipr.get_routes(family=fam, table=table) if r.get_attr("RTA_TABLE") == table]
        return {"rules": rules, "routes": routes}

    state = topo.host.run(read)
    out = topo.host.popen(["nft", "-j", "list", "tables"], stdout=subprocess.PIPE, text=True).communicate(timeout=10)[0]
    state["nft"] = sorted(item["table"]["name"] for item in json.loads(out)["nftables"] if "table" in item)
    return state
