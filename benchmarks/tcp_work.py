"""Work per unit of the userland TCP path, counted rather than timed.

The machine is shared, so wall-clock rates are noisy; these counts are not:

* ``syscalls``: ``strace -c -f`` attached to the relay process while a client makes N
  short connections one after the other (HTTP/1.0 GET to nginx, ``Connection: close``),
  or moves M MiB over one connection (``--mib``) — syscalls per connection / per MB;
* ``instructions``: the relay under ``valgrind --tool=callgrind``, its counters dumped
  just before and just after the same work (``callgrind_control -d``): user-space
  instructions per connection / per MB, startup excluded;
* ``cpu``: user + system CPU of the relay (from /proc) per connection and per GB, for
  portproxy and docker-proxy side by side, with wrk (``Connection: close``, 32 at a
  time), the bulk transfer and one iperf3 stream; noisy, kept for the ratios the
  targets are stated in.

Everything runs in the benchmark's own namespaces (``bench_topology``); nothing is
touched in the root namespace. Usage::

    python benchmarks/tcp_work.py syscalls --connections 2000
    python benchmarks/tcp_work.py syscalls --wrk 5
    python benchmarks/tcp_work.py syscalls --mib 1024
    python benchmarks/tcp_work.py instructions --connections 300
    python benchmarks/tcp_work.py cpu --seconds 10
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from portproxy import debcache
from portproxy.bench.servers import nginx_conf
from portproxy.bench.topology import bench_topology
from portproxy.lab.namespaces import Namespace
from portproxy.lab.topology import DemoTopology

HTTP_PORT = 8080
SINK_PORT = 7000
PROXY_PORT = 9090
SINK_PROXY_PORT = 9091
IPERF_PORT = 5201
IPERF_PROXY_PORT = 9092
REQUEST = b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"
SINK = f"""
import socket
sink = socket.socket()
sink.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sink.bind(("0.0.0.0", {SINK_PORT}))
sink.listen(16)
buf = bytearray(1 << 20)
while True:
    conn, _ = sink.accept()
    while conn.recv_into(buf):
        pass
    conn.close()
"""


# --- servers in the container -------------------------------------------------------------
@contextlib.contextmanager
def servers(topo: DemoTopology) -> Iterator[None]:
    """nginx (one worker, ``return 200``) and a discard sink, both in the container."""
    with tempfile.TemporaryDirectory(prefix="tcp-work-nginx-") as tmp:
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(nginx_conf(tmp, f"""    access_log off;
    server {{
        listen {HTTP_PORT} backlog=8192;
        location / {{ return 200 "ok\\n"; }}
    }}"""))
        nginx = topo.container.popen([*debcache.command("nginx"), "-c", str(conf), "-p", tmp, "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # The sink is a process of its own: in a thread here it would share the GIL with
        # the sending client, and the relay's pattern would follow their contention.
        sink = topo.container.popen([sys.executable, "-c", SINK], stdout=subprocess.DEVNULL)
        iperf = topo.container.popen([*debcache.command("iperf3"), "-s", "-p", str(IPERF_PORT)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        try:
            yield
        finally:
            for proc in (sink, iperf):
                proc.kill()
                proc.wait()
            nginx.terminate()
            nginx.wait(10)


# --- clients in the client namespace ------------------------------------------------------
def short_connections(ns: Namespace, host: str, n: int) -> None:
    """N HTTP/1.0 requests, one connection each, one after the other."""
    for _ in range(n):
        with ns.socket() as s:
            s.connect((host, PROXY_PORT))
            s.sendall(REQUEST)
            got = b""
            while chunk := s.recv(4096):
                got += chunk
            if not got.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"bad answer: {got[:80]!r}")


def bulk(ns: Namespace, host: str, mib: int) -> None:
    """M MiB to the sink over one connection, then EOF and wait for the proxy's FIN."""
    block = os.urandom(1 << 20)
    with ns.socket() as s:
        s.connect((host, SINK_PROXY_PORT))
        for _ in range(mib):
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass


def work(topo: DemoTopology, connections: int, mib: int) -> None:
    if connections:
        short_connections(topo.client, topo.host_ip, connections)
    if mib:
        bulk(topo.client, topo.host_ip, mib)


# --- the relay ----------------------------------------------------------------------------
def portproxy_argv(topo: DemoTopology, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "portproxy", "map", f"{PROXY_PORT}:{topo.container_ip}:{HTTP_PORT}",
            f"{SINK_PROXY_PORT}:{topo.container_ip}:{SINK_PORT}",
            f"{IPERF_PROXY_PORT}:{topo.container_ip}:{IPERF_PORT}", *extra]


def start_portproxy(topo: DemoTopology, prefix: list[str], extra: list[str]) -> subprocess.Popen:
    proc = topo.host.popen([*prefix, *portproxy_argv(topo, extra)], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    ready = 0
    assert proc.stdout is not None
    while ready < 3:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"portproxy exited {proc.wait()}")
        ready += line.startswith("ready")
    return proc


def python_pid(proc: subprocess.Popen) -> int:
    """The python process itself (under valgrind the launched pid is that process)."""
    return proc.pid


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- syscalls -----------------------------------------------------------------------------
_STRACE_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)\s*$")


def count_syscalls(topo: DemoTopology, connections: int, mib: int, extra: list[str],
                   wrk_seconds: int = 0) -> tuple[dict[str, int], float]:
    """Syscalls by name, and the connections made (wrk's count with ``wrk_seconds``)."""
    proc = start_portproxy(topo, [], extra)
    try:
        work(topo, 3, 0)  # warm: the first connection imports and allocates
        with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
            strace = subprocess.Popen(["strace", "-c", "-f", "-q", "-o", out.name, "-p", str(proc.pid)],
                                      stderr=subprocess.DEVNULL)
            time.sleep(1.0)
            if wrk_seconds:
                connections = int(wrk(topo, wrk_seconds))
            else:
                work(topo, connections, mib)
            time.sleep(0.5)
            strace.send_signal(signal.SIGINT)
            strace.wait(30)
            counts: dict[str, int] = {}
            for line in out.read().splitlines():
                m = _STRACE_ROW.match(line)
                if m and m.group(3) != "total":
                    counts[m.group(3)] = int(m.group(1))
            return counts, connections
    finally:
        stop(proc)


# --- instructions -------------------------------------------------------------------------
def count_instructions(topo: DemoTopology, connections: int, mib: int, extra: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="tcp-work-cg-") as tmp:
        keep = os.environ.get("TCP_WORK_KEEP")
        out = f"{tmp}/cg.out"
        valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--compress-strings=no", "-q"]
        proc = start_portproxy(topo, valgrind, extra)
        try:
            work(topo, 3, 0)
            subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True, timeout=120)
            work(topo, connections, mib)
            subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True, timeout=120)
        finally:
            stop(proc)
        dumps = sorted(Path(tmp).glob("cg.out.*"), key=lambda p: int(p.name.rsplit(".", 1)[1]))[1:]
        if not dumps:
            raise RuntimeError("callgrind wrote no dump")
        if keep:  # for callgrind_annotate
            Path(keep).write_bytes(dumps[0].read_bytes())
        for line in dumps[0].read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
        raise RuntimeError("no totals in the callgrind dump")


# --- CPU, side by side with docker-proxy --------------------------------------------------
def cpu_split(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of these processes so far."""
    user = system = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        user += int(fields[11])
        system += int(fields[12])
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


def start_docker_proxy(topo: DemoTopology) -> list[subprocess.Popen]:
    procs = []
    for hp, tp in ((PROXY_PORT, HTTP_PORT), (SINK_PROXY_PORT, SINK_PORT), (IPERF_PROXY_PORT, IPERF_PORT)):
        r, w = os.pipe()
        argv = [*debcache.command("docker-proxy"), "-proto", "tcp", "-host-ip", "0.0.0.0", "-host-port", str(hp),
                "-container-ip", topo.container_ip, "-container-port", str(tp)]
        procs.append(topo.host.popen(argv, fds={3: w}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        os.close(w)
        with os.fdopen(r) as status:
            if not status.read(2).startswith("0"):
                raise RuntimeError("docker-proxy refused")
    return procs


def wrk(topo: DemoTopology, seconds: int) -> float:
    argv = [*debcache.command("wrk"), "-t", "1", "-c", "32", "-d", f"{seconds}s", "--timeout", "5s",
            "-H", "Connection: close", f"http://{topo.host_ip}:{PROXY_PORT}/"]
    out = topo.client.popen(argv, stdout=subprocess.PIPE, text=True).communicate(timeout=seconds + 60)[0]
    total = re.search(r"(\d+) requests in", out)
    if not total or "Socket errors" in out or "Non-2xx" in out:
        raise RuntimeError(f"wrk failed: {out[-300:]!r}")
    return float(total.group(1))


def iperf(topo: DemoTopology, mib: int) -> tuple[float, float]:
    """One iperf3 stream of ``mib`` MiB through the relay: (bytes received, Gbit/s)."""
    argv = [*debcache.command("iperf3"), "-c", topo.host_ip, "-p", str(IPERF_PROXY_PORT), "-n", f"{mib}M", "-J"]
    out = json.loads(topo.client.popen(argv, stdout=subprocess.PIPE, text=True).communicate(timeout=300)[0])
    end = out["end"]["sum_received"]
    return float(end["bytes"]), float(end["bits_per_second"]) / 1e9


def cpu(topo: DemoTopology, seconds: int, mib: int, extra: list[str], rounds: int) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for _ in range(rounds):
        for path in ("portproxy", "docker-proxy"):
            if path == "portproxy":
                procs = [start_portproxy(topo, [], extra)]
            else:
                procs = start_docker_proxy(topo)
            pids = [p.pid for p in procs]
            try:
                work(topo, 3, 0)
                u0, s0 = cpu_split(pids)
                n = wrk(topo, seconds)
                u1, s1 = cpu_split(pids)
                results[path]["cpu_us_per_connection"].append((u1 - u0 + s1 - s0) / n * 1e6)
                results[path]["user_us_per_connection"].append((u1 - u0) / n * 1e6)
                results[path]["connections_per_s"].append(n / seconds)
                bulk(topo.client, topo.host_ip, mib)
                u2, s2 = cpu_split(pids)
                gb = mib * (1 << 20) / 1e9
                results[path]["cpu_s_per_gb"].append((u2 - u1 + s2 - s1) / gb)
                results[path]["user_s_per_gb"].append((u2 - u1) / gb)
                sent, gbit_s = iperf(topo, mib)
                u3, s3 = cpu_split(pids)
                results[path]["iperf3_cpu_s_per_gb"].append((u3 - u2 + s3 - s2) / (sent / 1e9))
                results[path]["iperf3_gbit_s"].append(gbit_s)
            finally:
                for p in procs:
                    stop(p)
    return {k: dict(v) for k, v in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("syscalls", "instructions", "cpu"))
    parser.add_argument("--connections", type=int, default=0)
    parser.add_argument("--mib", type=int, default=0)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--wrk", type=int, default=0, metavar="SECONDS",
                        help="syscalls: wrk (32 connections at a time) for SECONDS instead of one at a time")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--proxy-arg", action="append", default=[], help="extra argument to portproxy map")
    args = parser.parse_args()
    with bench_topology("tcpwork") as topo, servers(topo):
        if args.what == "syscalls":
            counts, made = count_syscalls(topo, args.connections, args.mib, args.proxy_arg, args.wrk)
            units = made or args.mib * (1 << 20) / 1e6
            unit = "connection" if made else "MB"
            total = sum(counts.values())
            print(json.dumps({"unit": unit, "units": units, "total": total, "per_unit": round(total / units, 3),
                              "by_call": {k: round(v / units, 3) for k, v in
                                          sorted(counts.items(), key=lambda kv: -kv[1])}}))
        elif args.what == "instructions":
            ir = count_instructions(topo, args.connections, args.mib, args.proxy_arg)
            units = args.connections or args.mib * (1 << 20) / 1e6
            unit = "connection" if args.connections else "MB"
            print(json.dumps({"unit": unit, "units": units, "instructions": ir, "per_unit": round(ir / units)}))
        else:
            print(json.dumps(cpu(topo, args.seconds, args.mib or 1024, args.proxy_arg, args.rounds)))


if __name__ == "__main__":
    main()
