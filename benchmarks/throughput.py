"""Single-stream TCP throughput: portproxy's userland paths vs docker-proxy vs nftables DNAT.

    .venv/bin/python benchmarks/throughput.py [--seconds 5] [--rounds 3] [--parallel 1]

Builds the seeds' topology in its own namespaces, runs every path side by side in
one run with the rounds alternated (drift hits all paths alike), and writes
benchmarks/results/throughput.json plus a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=1)
    args = parser.parse_args()

    docker_proxy = harness.find_docker_proxy()
    with harness.topology() as topo:
        harness.tune(topo)
        ctr = topo.container_ip
        port = harness.IPERF_PORT
        paths: list[tuple[str, str, int]] = [("direct (no NAT)", ctr, port)]
        procs = []
        pids: dict[str, int] = {}
        try:
            procs.append(harness.start_portproxy(topo.host, ["map", "--mode", "kernel", f"9001:{ctr}:{port}"]))
            paths.append(("kernel (nftables DNAT)", topo.host_ip, 9001))
            procs.append(harness.start_portproxy(topo.host, ["map", f"9002:{ctr}:{port}"]))
            paths.append(("userland splice (uvloop)", topo.host_ip, 9002))
            pids["userland splice (uvloop)"] = procs[-1].pid
            procs.append(harness.start_portproxy(topo.host, ["map", f"9003:{ctr}:{port}", "--no-splice"]))
            paths.append(("userland copy (uvloop)", topo.host_ip, 9003))
            pids["userland copy (uvloop)"] = procs[-1].pid
            procs.append(harness.start_portproxy(topo.host, ["map", f"9004:{ctr}:{port}", "--loop", "asyncio"]))
            paths.append(("userland splice (asyncio)", topo.host_ip, 9004))
            pids["userland splice (asyncio)"] = procs[-1].pid
            if docker_proxy:
                procs.append(harness.start_docker_proxy(topo.host, docker_proxy, 9005, ctr, port))
                paths.append(("docker-proxy", topo.host_ip, 9005))
                pids["docker-proxy"] = procs[-1].pid
            results: dict[str, list[float]] = {name: [] for name, _, _ in paths}
            cpu_per_gb: dict[str, list[float]] = {name: [] for name in pids}
            with harness.iperf_server(topo):
                for rnd in range(args.rounds):
                    for name, host, p in paths:
                        before = harness.cpu_seconds(pids[name]) if name in pids else 0.0
                        result = harness.iperf(topo, host, p, args.seconds, args.parallel)
                        value = harness.gbits(result)
                        results[name].append(value)
                        note = ""
                        if name in pids:
                            # CPU the relaying process spent per GB it moved (kernel time included).
                            spent = harness.cpu_seconds(pids[name]) - before
                            cpu_per_gb[name].append(spent / (harness.received_bytes(result) / 1e9))
                            note = f"  {cpu_per_gb[name][-1]:.2f} CPU-s/GB"
                        print(f"round {rnd + 1}/{args.rounds} {name:<28} {value:6.2f} Gbit/s{note}", file=sys.stderr)
        finally:
            harness.stop(procs)
    summary = {name: harness.summarize(values) for name, values in results.items()}
    cpu = {name: harness.summarize(values) for name, values in cpu_per_gb.items()}
    harness.write_result(f"throughput-P{args.parallel}", {"seconds": args.seconds, "parallel": args.parallel,
                                                          "gbit_per_s": summary, "cpu_seconds_per_gb": cpu})
    kernel = summary["kernel (nftables DNAT)"]["median"]
    dp = summary.get("docker-proxy", {}).get("median")
    print(f"\n| path ({args.parallel} stream{'s' if args.parallel > 1 else ''}) | Gbit/s median | min–max "
          "| × kernel | × docker-proxy | proxy CPU-s per GB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, s in summary.items():
        ratio_dp = f"{s['median'] / dp:.2f}" if dp else "–"
        cpu_text = f"{cpu[name]['median']:.2f}" if name in cpu else "– (in-kernel)"
        print(f"| {name} | {s['median']:.2f} | {s['min']:.2f}–{s['max']:.2f} | {s['median'] / kernel:.2f} "
              f"| {ratio_dp} | {cpu_text} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
