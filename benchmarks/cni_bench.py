"""CNI ADD and DEL time for 1, 100 and 1,000 published ports: portproxy-cni vs Debian's portmap.

    .venv/bin/python benchmarks/cni_bench.py [--ports 1,100,1000] [--rounds 3] [--podman-rounds 5] [--out NAME]

In namespaces of its own (the demo topology, plus a container that Debian's ``bridge`` +
``host-local`` plug in), the plugin under test is run as a runtime runs it (a process per
command, prevResult on stdin) and the wall time of each ADD and DEL is taken. Two port
layouts: ``range`` (consecutive host and container ports, what ``-p 20000-20999:...``
expands to) and ``scattered`` (every other host port, so no two entries form a range).
Then ``podman run -d -p 9090:8080`` end to end (Debian 12's podman 4.3 with CNI, extracted
and run in a private mount namespace as in tests/test_cni_podman.py), each mapper in turn.
Writes benchmarks/results/cni_bench.json and .md, and the table on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: the tests' CNI test bed

from tests.support.cni_testbed import Chain, Podman, debian_plugins, plugin_dir, podman_packages, portproxy_daemon  # noqa: E402
from portproxy.lab.namespaces import Namespace  # noqa: E402
from portproxy.lab.topology import demo_topology  # noqa: E402

MAPPERS = ("portmap", "portproxy-cni", "portproxy-cni+daemon")
"""``+daemon``: portproxy-cni registering the mappings with a ``portproxy serve`` in the same namespace."""
RESULTS = Path(__file__).resolve().parent / "results"


def port_mappings(n: int, layout: str) -> list[dict]:
    step = 1 if layout == "range" else 2
    return [{"hostPort": 20000 + step * i, "containerPort": 8000 + i, "protocol": "tcp"} for i in range(n)]


def timed(chain: Chain, command: str, netns: str, mappings: list[dict], prev: dict) -> float:
    t0 = time.perf_counter()
    got = chain.mapper_call(command, "bench", netns, mappings, prev)
    elapsed = time.perf_counter() - t0
    if got.rc != 0:
        raise SystemExit(f"{chain.mapper} {command} failed: {got.stdout} {got.stderr}")
    return elapsed


def podman_run_times(mappers: list[str], rounds: int, cache: Path) -> dict[str, list[float]]:
    """Wall time of ``podman run -d -p 9090:8080`` (then removed untimed), ``rounds`` times per
    mapper, the mappers taking turns within each round (each in a topology and podman of its
    own), so a busy moment of the machine falls on all of them alike."""
    times: dict[str, list[float]] = {mapper: [] for mapper in mappers}
    with contextlib.ExitStack() as stack:
        podmans = {}
        for n, mapper in enumerate(mappers):
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            topo = stack.enter_context(demo_topology(f"pcb{n}"))
            topo.host.sysctl("net/ipv4/ip_forward", "1")
            conf = {"daemonSocket": str(stack.enter_context(portproxy_daemon(topo.host, tmp / "daemon")))} \
                if mapper.endswith("+daemon") else {}
            podman = Podman(topo, tmp, podman_packages(), cache, mapper.split("+")[0], conf)
            stack.callback(podman.close)
            podman.run_web("warmup", "9089:8080")
            podmans[mapper] = podman
        for i in range(rounds):
            for mapper, podman in podmans.items():
                t0 = time.perf_counter()
                podman.run_web(f"web{i}", "9090:8080")
                times[mapper].append(time.perf_counter() - t0)
                podman("rm", "-f", "-t", "0", f"web{i}")
    return times


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ports", default="1,100,1000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mappers", default=",".join(MAPPERS))
    parser.add_argument("--layouts", default="range,scattered")
    parser.add_argument("--podman-rounds", type=int, default=5)
    parser.add_argument("--out", default="cni_bench", help="result file name in benchmarks/results/ (.json, .md)")
    args = parser.parse_args()
    counts = [int(n) for n in args.ports.split(",") if n]
    cache = debian_plugins()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, demo_topology("pcb") as topo, contextlib.ExitStack() as stack:
        plugins = plugin_dir(Path(tmp) / "bin", cache)
        ctr = Namespace.create("pcb-ctr")
        topo.extra.append(ctr)
        for mapper in args.mappers.split(",") if counts else []:
            conf = {"daemonSocket": ""}  # daemonless, whatever is at the default socket path
            if mapper.endswith("+daemon"):
                conf = {"daemonSocket": str(stack.enter_context(portproxy_daemon(topo.host, Path(tmp) / "daemon")))}
            chain = Chain(topo.host, plugins, cache, Path(tmp) / f"ipam-{mapper}", mapper.split("+")[0],
                          mapper_conf=conf)
            env = chain.env("ADD", "bench", ctr.name)
            prev = chain.invoke("bridge", env, json.dumps(chain.conf(chain.bridge_conf()))).json
            for layout in args.layouts.split(","):
                for n in counts:
                    mappings = port_mappings(n, layout)
                    add, delete = [], []
                    for _ in range(args.rounds):
                        add.append(timed(chain, "ADD", ctr.name, mappings, prev))
                        delete.append(timed(chain, "DEL", ctr.name, mappings, prev))
                    row = {"mapper": mapper, "layout": layout, "ports": n, "add_s": add, "del_s": delete,
                           "add_median_s": statistics.median(add), "del_median_s": statistics.median(delete)}
                    rows.append(row)
                    print(f"{mapper} {layout} {n} ports: ADD {row['add_median_s']:.3f} s, "
                          f"DEL {row['del_median_s']:.3f} s", file=sys.stderr)
            chain.invoke("bridge", chain.env("DEL", "bench", ctr.name), json.dumps(chain.conf(chain.bridge_conf(), prev)))
    podman_rows = []
    if args.podman_rounds:
        for mapper, times in podman_run_times(args.mappers.split(","), args.podman_rounds, cache).items():
            podman_rows.append({"mapper": mapper, "run_s": times, "run_median_s": statistics.median(times)})
            print(f"{mapper}: podman run -d -p 9090:8080 {podman_rows[-1]['run_median_s']:.3f} s", file=sys.stderr)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"rounds": args.rounds, "rows": rows,
                                                        "podman": podman_rows}, indent=2) + "\n")
    lines = ["| plugin | layout | ports | ADD (median) | DEL (median) |", "|---|---|---:|---:|---:|"] if rows else []
    lines += [f"| {row['mapper']} | {row['layout']} | {row['ports']} | {row['add_median_s'] * 1000:.0f} ms "
              f"| {row['del_median_s'] * 1000:.0f} ms |" for row in rows]
    if podman_rows:
        lines += ["" if lines else "# podman", "| plugin | `podman run -d -p 9090:8080` (median) |", "|---|---:|"]
        lines += [f"| {row['mapper']} | {row['run_median_s'] * 1000:.0f} ms |" for row in podman_rows]
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
