"""Kernel path at scale: time to apply 10,000 mappings in one batch, and single-stream
throughput with 10,000 mappings installed vs with one.

    .venv/bin/python benchmarks/kernel_scale.py [--mappings 10000] [--seconds 5] [--rounds 3]

Writes benchmarks/results/kernel_scale.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

from portproxy.kernel.builders import KernelOptions  # noqa: E402
from portproxy.kernel.path import KernelPath  # noqa: E402
from portproxy.spec import Mapping, parse_spec  # noqa: E402


def many(n: int, target: str) -> list[Mapping]:
    """n mappings: TCP then UDP ports from 20000 up, all to the iperf port 5201 on the target...
    except the measured one, 9001, which is always first."""
    specs = [f"9001:{target}:{harness.IPERF_PORT}"]
    port = 20000
    while len(specs) < n:
        proto = "tcp" if len(specs) % 2 else "udp"
        specs.append(f"{port}:{target}:{harness.IPERF_PORT}/{proto}")
        if proto == "udp":
            port += 1
    return [parse_spec(s) for s in specs]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mappings", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with harness.topology() as topo:
        mappings = many(args.mappings, topo.container_ip)
        path = topo.host.run(KernelPath, KernelOptions())
        apply_seconds = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            topo.host.run(path.install, mappings)
            apply_seconds.append(time.perf_counter() - t0)
            print(f"applied {len(mappings)} mappings in one batch: {apply_seconds[-1]:.3f} s", file=sys.stderr)
        gbit: dict[str, list[float]] = {"1 mapping": [], f"{len(mappings)} mappings": []}
        with harness.container_servers(topo):
            for rnd in range(args.rounds):
                for label, installed in (("1 mapping", mappings[:1]), (f"{len(mappings)} mappings", mappings)):
                    topo.host.run(path.install, installed)
                    value = harness.gbits(harness.iperf(topo.client, topo.host_ip, 9001, args.seconds))
                    gbit[label].append(value)
                    print(f"round {rnd + 1}/{args.rounds} {label:<16} {value:6.2f} Gbit/s", file=sys.stderr)
        topo.host.run(path.teardown)
    summary = {label: harness.summarize(values) for label, values in gbit.items()}
    harness.write_result("kernel_scale", {"mappings": len(mappings), "apply_seconds": harness.summarize(apply_seconds),
                                          "gbit_per_s": summary})
    print(f"\napply {len(mappings)} mappings in one batch: median {statistics.median(apply_seconds):.3f} s "
          f"(min {min(apply_seconds):.3f}, max {max(apply_seconds):.3f})")
    harness.print_ratio_table("installed", summary, "1 mapping")
    return 0


if __name__ == "__main__":
    sys.exit(main())
