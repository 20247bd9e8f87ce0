"""Slow readers before and after their limits: kernel memory pinned by N never-reading
clients per path, and single-stream throughput both ways, old code against new.

    .venv/bin/python benchmarks/slow_readers.py --before a62dc7e [--clients 200] [--rounds 5] [--seconds 5]

"Before" runs the portproxy of git revision ``--before`` (exported to a temporary
directory and put first on PYTHONPATH of the proxy processes); "after" runs this tree.
The memory figure is portproxy.bench.slow_readers' (ss -tm skmem r+w+f of every TCP
socket of the three namespaces, plus bytes waiting in the relays' pipes). Writes
benchmarks/results/slow_readers.json and Markdown tables on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

from portproxy.bench.paths import PathDef, Starter, available_paths, portproxy_starter  # noqa: E402
from portproxy.bench.slow_readers import Firehose, pinned_by_slow_readers  # noqa: E402
from portproxy.bench.topology import reset_conntrack  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PORT = 9001


@contextlib.contextmanager
def exported(revision: str) -> Iterator[str]:
    """The portproxy package of ``revision`` in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="portproxy-before-") as tmp:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "portproxy"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        yield tmp


def from_tree(starter: Starter, tree: str) -> Starter:
    """``starter`` with the proxy processes importing portproxy from ``tree``: first on
    PYTHONPATH, and their working directory too (``python -m`` puts it before PYTHONPATH,
    and from this repository it would find this tree's package)."""
    def start(topo, forwards):  # type: ignore[no-untyped-def]
        old, cwd = os.environ.get("PYTHONPATH"), os.getcwd()
        os.environ["PYTHONPATH"] = tree
        os.chdir(tree)
        try:
            return starter(topo, forwards)
        finally:
            os.chdir(cwd)
            if old is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = old

    return start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", required=True, help="git revision of the code before the change")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--memory-rounds", type=int, default=1, help="memory measurements per path (median kept)")
    parser.add_argument("--no-throughput", action="store_true")
    args = parser.parse_args()

    paths = {p.key: p for p in available_paths()}
    with exported(args.before) as old_tree, harness.topology() as topo:
        variants = [paths["direct"]]
        for key, extra in (("userland-splice", ()), ("userland-copy", ("--no-splice",))):
            variants.append(PathDef(f"{key} before", f"{paths[key].label}, before", frozenset({"tcp"}),
                                    from_tree(portproxy_starter(*extra), old_tree)))
            variants.append(paths[key])
        if "docker-proxy" in paths:
            variants.append(paths["docker-proxy"])
        runs: dict[str, list[dict]] = {}
        firehose = Firehose(topo)
        try:
            for rnd in range(args.memory_rounds):
                for path in variants:
                    reset_conntrack(topo)
                    r = pinned_by_slow_readers(topo, firehose, path, args.clients)
                    runs.setdefault(path.key, []).append(r)
                    print(f"round {rnd + 1} {path.key}: {r['total_mib']:.1f} MiB pinned "
                          f"(memory pressure events: {r['memory_pressures']:.0f})", file=sys.stderr)
        finally:
            firehose.close()
        memory = {key: sorted(rs, key=lambda r: r["total_mib"])[len(rs) // 2] for key, rs in runs.items()}
        gbit: dict[str, list[float]] = {}
        starters = {"before": from_tree(portproxy_starter(), old_tree), "after": portproxy_starter()}
        with harness.container_servers(topo):
            for rnd in range(0 if args.no_throughput else args.rounds):
                order = list(starters) if rnd % 2 == 0 else list(reversed(starters))
                for version in order:
                    running = starters[version](topo, [(PORT, harness.IPERF_PORT, "tcp")])
                    try:
                        for direction, reverse in (("client → container", False), ("container → client", True)):
                            reset_conntrack(topo)
                            value = harness.gbits(harness.iperf(topo.client, topo.host_ip, PORT, args.seconds,
                                                                reverse=reverse))
                            gbit.setdefault(f"{direction}, {version}", []).append(value)
                            print(f"round {rnd + 1} {version} {direction}: {value:.2f} Gbit/s", file=sys.stderr)
                    finally:
                        running.stop()
    direct = memory["direct"]["total_mib"]
    print(f"\n| path ({args.clients} never-reading clients; median run) | total MiB | × direct | KiB per client | "
          "client ns | host ns | container ns | pipes | all runs (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for key, r in memory.items():
        every = ", ".join(f"{x['total_mib']:.0f}" + ("*" if x["memory_pressures"] else "") for x in runs[key])
        print(f"| {key} | {r['total_mib']:.1f} | {r['total_mib'] / direct:.2f} | {r['kib_per_client']:.0f} | "
              f"{r['client_mib']:.1f} | {r['host_mib']:.1f} | {r['container_mib']:.1f} | {r['pipes_mib']:.1f} | "
              f"{every} |")
    print("\n\\* the host's TCP memory was under pressure during that run (buffers stop growing: an under-count)")
    summary = {label: harness.summarize(values) for label, values in gbit.items()}
    print("\n| userland-splice, 1 stream | Gbit/s median | min–max | runs |")
    print("|---|---:|---:|---|")
    for label, s in summary.items():
        runs = ", ".join(f"{v:.2f}" for v in gbit[label])
        print(f"| {label} | {s['median']:.2f} | {s['min']:.2f}–{s['max']:.2f} | {runs} |")
    written = harness.write_result("slow_readers", {"before": args.before, "clients": args.clients,
                                                    "memory": memory, "memory_runs": runs, "gbit": gbit,
                                                    "summary": summary})
    print(f"\nwrote {written}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
