"""Docker's published ports: memory per port and time to ready, for docker-proxy, the drop-in
standalone and the drop-in delegated to ``portproxy serve``.

    .venv/bin/python benchmarks/docker_ports.py [--ports 1000] [--sample 200]

Every proxy is started as dockerd starts it (fd 3 a pipe, ``-proto tcp -host-ip 0.0.0.0
-host-port P -container-ip C -container-port 8080``), one after the other, each waiting for
the previous one's ``0\\n``, in the host namespace of a demo topology of its own.

* **time to ready**: from just before the spawn (fork + exec) to ``0\\n`` read from fd 3, the
  time dockerd waits per port; median and 90th percentile over every start;
* **PSS per port** at ``--ports`` ports: the sum of ``Pss`` from ``/proc/PID/smaps_rollup`` of
  every proxy process, plus the daemon's whole PSS when delegated, divided by the ports.
  PSS divides shared pages among the processes that map them, so the sum is the memory the
  ports really cost. docker-proxy and the delegated drop-in are measured at the full count;
  the standalone drop-in (a Python interpreter with asyncio per port, ~12 MB PSS each) at
  ``--sample`` ports and scaled (per-process PSS barely changes with the count; the sharing
  of the interpreter's text is the only term that shrinks, so this slightly favours it).

Writes benchmarks/results/docker_ports.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from portproxy.bench.paths import find_docker_proxy
from portproxy.bench.procfs import pss_kib
from portproxy.bench.servers import _stop as stop_processes
from portproxy.lab.namespaces import Namespace
from portproxy.lab.topology import demo_topology

DROPIN = str(Path(sys.executable).parent / "portproxy-docker-proxy")
BASE_PORT = 30000
TARGETS = {"pss_ratio": 0.25, "ready_ms": 25.0}


def start_proxy(ns: Namespace, binary: list[str], port: int, target: str, env: dict[str, str]) -> tuple[subprocess.Popen, float]:
    """One proxy as dockerd starts it; (process, seconds from spawn to ``0\\n``)."""
    read_end, write_end = os.pipe()
    args = ["-proto", "tcp", "-host-ip", "0.0.0.0", "-host-port", str(port), "-container-ip", target,
            "-container-port", "8080"]
    began = time.perf_counter()
    proc = ns.popen([*binary, *args], fds={3: write_end}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    env=env)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as status:
        answer = status.read()
    elapsed = time.perf_counter() - began
    if answer != b"0\n":
        proc.kill()
        raise RuntimeError(f"{binary[-1]} on port {port}: {answer!r}")
    return proc, elapsed


def measure(name: str, ns: Namespace, binary: list[str], count: int, target: str, env: dict[str, str],
            daemon: subprocess.Popen | None) -> dict[str, float]:
    procs: list[subprocess.Popen] = []
    times: list[float] = []
    try:
        for i in range(count):
            proc, elapsed = start_proxy(ns, binary, BASE_PORT + i, target, env)
            procs.append(proc)
            times.append(elapsed)
        time.sleep(2)  # the standalone drop-ins finish importing the proxy after readiness
        proxies_kib = sum(pss_kib(p.pid) for p in procs)
        daemon_kib = pss_kib(daemon.pid) if daemon is not None else 0
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)  # what dockerd sends; then whatever is left
        stop_processes(procs)
    ordered = sorted(times)
    return {"ports_measured": count, "proxy_pss_kib": proxies_kib, "daemon_pss_kib": daemon_kib,
            "pss_per_port_kib": (proxies_kib + daemon_kib) / count,
            "ready_median_ms": statistics.median(times) * 1000,
            "ready_p90_ms": ordered[int(len(ordered) * 0.9)] * 1000}


def start_daemon(ns: Namespace, tmp: Path) -> tuple[subprocess.Popen, Path]:
    sock = tmp / "pp.sock"
    (tmp / "portproxy.toml").write_text("")
    daemon = ns.popen([sys.executable, "-m", "portproxy", "serve", "--config", str(tmp / "portproxy.toml"),
                       "--state-dir", str(tmp / "state"), "--socket", str(sock), "--metrics-addr", "off",
                       "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert daemon.stdout is not None
    line = daemon.stdout.readline()
    if not line.startswith("ready"):
        daemon.kill()
        raise RuntimeError(f"portproxy serve did not start: {line!r}")
    return daemon, sock


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ports", type=int, default=1000)
    parser.add_argument("--sample", type=int, default=200,
                        help="ports measured for the standalone drop-in (~12 MB PSS each), scaled to --ports "
                             "(default 200)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "docker_ports.json")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("docker_ports.py: needs root (network namespaces)", file=sys.stderr)
        return 1
    results: dict[str, dict[str, float]] = {}
    base_env = {k: v for k, v in os.environ.items() if k != "PORTPROXY_SOCKET"}
    docker_proxy = find_docker_proxy()
    with demo_topology("dpb") as topo, tempfile.TemporaryDirectory(prefix="portproxy-docker-bench-") as tmp:
        variants = [("docker-proxy", docker_proxy), ("drop-in standalone", [DROPIN]), ("drop-in delegated", [DROPIN])]
        for name, binary in variants:
            if binary is None:
                print(f"{name}: unavailable, left out", file=sys.stderr)
                continue
            daemon, env = None, base_env
            count = min(args.sample, args.ports) if name == "drop-in standalone" else args.ports
            if name == "drop-in delegated":
                daemon, sock = start_daemon(topo.host, Path(tmp))
                env, count = {**base_env, "PORTPROXY_SOCKET": str(sock)}, args.ports
            print(f"{name}: starting {count} proxies", file=sys.stderr, flush=True)
            try:
                results[name] = measure(name, topo.host, binary, count, topo.container_ip, env, daemon)
            finally:
                if daemon is not None:
                    daemon.terminate()
                    daemon.wait(timeout=60)
    reference = results.get("docker-proxy", {}).get("pss_per_port_kib")
    print(f"| variant | PSS per port (at {args.ports} ports) | vs docker-proxy | exec → `0\\n` median | p90 | measured at |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        ratio = f"{r['pss_per_port_kib'] / reference:.2f}×" if reference else "-"
        print(f"| {name} | {r['pss_per_port_kib']:.0f} KiB | {ratio} | {r['ready_median_ms']:.1f} ms | "
              f"{r['ready_p90_ms']:.1f} ms | {r['ports_measured']:.0f} ports |")
    delegated = results.get("drop-in delegated")
    if delegated and reference:
        print(f"\ntargets: delegated PSS/port ≤ {TARGETS['pss_ratio']} × docker-proxy's: "
              f"{delegated['pss_per_port_kib'] / reference:.2f}; exec → 0 median ≤ {TARGETS['ready_ms']:g} ms: "
              f"{delegated['ready_median_ms']:.1f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"ports": args.ports, "sample": args.sample, "targets": TARGETS,
                                    "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
