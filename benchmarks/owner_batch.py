"""A CNI owner's scattered kernel mappings through the control API: one ``PUT
/v1/owners/mappings`` (one kernel transaction, one state write) vs one ``POST /v1/mappings``
each, the way portproxy-cni registered them before; then their removal, ``PUT`` with ``[]``
vs ``DELETE /v1/mappings?owner=ID`` (a kernel transaction per mapping).

    .venv/bin/python benchmarks/owner_batch.py [--ports 100,1000] [--rounds 3]

A ``portproxy serve`` in the host namespace of the demo topology (its own namespaces,
removed at the end); wall time of the requests, over one kept-alive connection. Writes
benchmarks/results/owner_batch.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: the tests' CNI test bed

import harness  # noqa: E402

from tests.support.cni_testbed import portproxy_daemon  # noqa: E402
from portproxy.lab.topology import demo_topology  # noqa: E402

OWNER = {"kind": "cni", "id": "bench0123456789", "ifname": "eth0", "network": "bench"}


def scattered(n: int, target: str) -> list[dict]:
    """Every other host port from 20000: no two mappings form a range."""
    return [{"spec": f"0.0.0.0:{20000 + 2 * i}:{target}:{8000 + i}/tcp", "mode": "kernel"} for i in range(n)]


async def one_round(sock: Path, mappings: list[dict]) -> dict[str, float]:
    """Seconds to add, then remove, the mappings: in one PUT each, then by a POST per mapping."""
    times = {}
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as http:
        async def call(method: str, path: str, body: dict | None = None) -> None:
            async with http.request(method, f"http://portproxy{path}", json=body) as answer:
                if answer.status >= 300:
                    raise SystemExit(f"{method} {path}: {answer.status} {await answer.text()}")

        t0 = time.perf_counter()
        await call("PUT", "/v1/owners/mappings", {"owner": OWNER, "mappings": mappings})
        times["PUT add"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        await call("PUT", "/v1/owners/mappings", {"owner": OWNER, "mappings": []})
        times["PUT [] remove"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for mapping in mappings:
            await call("POST", "/v1/mappings", {**mapping, "owner": OWNER})
        times["POST each add"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        await call("DELETE", f"/v1/mappings?owner={OWNER['id']}")
        times["DELETE ?owner= remove"] = time.perf_counter() - t0
    return times


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ports", default="100,1000")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[int, dict[str, list[float]]] = {}
    with demo_topology("obb") as topo, tempfile.TemporaryDirectory() as tmp, \
            portproxy_daemon(topo.host, Path(tmp)) as sock:
        for n in (int(p) for p in args.ports.split(",")):
            mappings = scattered(n, topo.container_ip)
            results[n] = {}
            for rnd in range(args.rounds):
                for what, seconds in asyncio.run(one_round(sock, mappings)).items():
                    results[n].setdefault(what, []).append(seconds)
                    print(f"{n} ports, round {rnd + 1}/{args.rounds}: {what} {seconds:.3f} s", file=sys.stderr)
    harness.write_result("owner_batch", {"rounds": args.rounds, "seconds": {
        str(n): {what: harness.summarize(values) for what, values in times.items()} for n, times in results.items()}})
    print("\n| ports | operation | seconds median | min–max |\n|---:|---|---:|---:|")
    for n, times in results.items():
        for what, values in times.items():
            print(f"| {n} | {what} | {statistics.median(values):.3f} | {min(values):.3f}–{max(values):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
