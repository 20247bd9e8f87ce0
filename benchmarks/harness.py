"""Shared pieces of the benchmark scripts: topology with tuned sysctls, paths, iperf3, results.

Everything runs inside namespaces built here (the seeds' topology from
portproxy.netns); the root namespace is never touched. Per-namespace sysctls
that would otherwise distort the figures are set inside those namespaces only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from portproxy.netns import Namespace, SeedTopology, seed_topology

RESULTS = Path(__file__).resolve().parent / "results"
IPERF_PORT = 5201


def tune(topo: SeedTopology) -> None:
    """Sysctls inside the benchmark namespaces (never the root namespace)."""
    for ns in topo.namespaces():
        ns.sysctl("net/ipv4/ip_local_port_range", "10000 65000")
        ns.sysctl("net/ipv4/tcp_tw_reuse", "1")
    # Server-side TIME_WAIT would collide with the next path's reused client ports.
    topo.container.sysctl("net/ipv4/tcp_max_tw_buckets", "1024")


def find_docker_proxy() -> str | None:
    """docker-proxy from Debian's docker.io, extracted with dpkg -x (never installed)."""
    for candidate in (os.environ.get("DOCKER_PROXY"), shutil.which("docker-proxy"), "/usr/sbin/docker-proxy",
                      "/usr/libexec/docker/docker-proxy"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    cache = Path(tempfile.gettempdir()) / "portproxy-bench-docker-proxy"
    binary = cache / "x" / "usr" / "sbin" / "docker-proxy"
    if binary.exists():
        return str(binary)
    cache.mkdir(exist_ok=True)
    try:
        subprocess.run(["apt-get", "download", "docker.io"], cwd=cache, check=True, capture_output=True, timeout=600)
        deb = next(cache.glob("docker.io_*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), str(cache / "x")], check=True, capture_output=True, timeout=600)
    except (OSError, subprocess.SubprocessError, StopIteration) as exc:
        print(f"docker-proxy unavailable ({exc}); skipping it", file=sys.stderr)
        return None
    return str(binary) if binary.exists() else None


@dataclasses.dataclass
class Path_:
    """One way of reaching the container's port from the client."""

    name: str
    host: str
    port: int
    procs: list[subprocess.Popen] = dataclasses.field(default_factory=list)


def start_portproxy(ns: Namespace, args: list[str]) -> subprocess.Popen:
    proc = ns.popen([sys.executable, "-m", "portproxy", *args, "--log-level", "warning"],
                    stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("ready"):
        raise RuntimeError(f"portproxy {' '.join(args)} did not start")
    return proc


def start_docker_proxy(ns: Namespace, binary: str, port: int, target: str, target_port: int) -> subprocess.Popen:
    # docker-proxy reports readiness on fd 3; give it a pipe and wait for "0\n".
    r, w = os.pipe()
    os.set_inheritable(w, True)

    def argv() -> list[str]:
        return [binary, "-proto", "tcp", "-host-ip", "0.0.0.0", "-host-port", str(port),
                "-container-ip", target, "-container-port", str(target_port)]

    # dup the pipe to fd 3 in the child.
    proc = ns.popen(["sh", "-c", f'exec "$@" 3>&{w}', "docker-proxy", *argv()], pass_fds=(w,),
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(w)
    with os.fdopen(r) as status:
        ready = status.read(2)
    if not ready.startswith("0"):
        # docker-proxy 20.10 writes nothing on fd 3; fall back to polling the port.
        time.sleep(0.5)
    return proc


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def iperf_server(topo: SeedTopology, port: int = IPERF_PORT) -> Iterator[None]:
    proc = topo.container.popen(["iperf3", "-s", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    try:
        yield
    finally:
        stop([proc])


def iperf(topo: SeedTopology, host: str, port: int, seconds: float, parallel: int = 1,
          udp_rate: str | None = None, length: int | None = None) -> dict:
    argv = ["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-J", "-P", str(parallel)]
    if udp_rate:
        argv += ["-u", "-b", udp_rate]
    if length:
        argv += ["-l", str(length)]
    proc = topo.client.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=seconds + 60)
    result = json.loads(out)
    if "error" in result:
        raise RuntimeError(f"iperf3 to {host}:{port}: {result['error']}")
    return result


def gbits(result: dict) -> float:
    end = result["end"]
    summary = end.get("sum_received") or end.get("sum")
    return summary["bits_per_second"] / 1e9


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def received_bytes(result: dict) -> float:
    end = result["end"]
    summary = end.get("sum_received") or end.get("sum")
    return summary["bytes"]


def machine() -> dict:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version()}


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def print_ratio_table(title: str, summary: dict[str, dict], baseline: str) -> None:
    """A Markdown table of Gbit/s medians, min–max and the ratio to ``baseline``."""
    base = summary[baseline]["median"]
    print(f"\n| {title} | Gbit/s median | min–max | × {baseline} |")
    print("|---|---:|---:|---:|")
    for label, s in summary.items():
        print(f"| {label} | {s['median']:.2f} | {s['min']:.2f}–{s['max']:.2f} | {s['median'] / base:.2f} |")


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), **data}, indent=2))
    return path


def topology(prefix: str = "ppbench") -> contextlib.AbstractContextManager[SeedTopology]:
    return seed_topology(prefix)
