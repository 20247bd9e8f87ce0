"""Work per UDP datagram on the userland path: CPU-µs per datagram delivered, loss at
1 Gbit/s offered, request/response latency, and (with --strace) syscalls per datagram.

    .venv/bin/python benchmarks/udp_work.py [--seconds 5] [--rounds 3]
        [--variant NAME=PYTHONPATH ...] [--docker-proxy] [--veth-gro] [--strace]

Each variant is portproxy run from the tree on its PYTHONPATH (A/B of two trees), rounds
interleaved variant by variant, docker-proxy beside them when asked. ``--veth-gro``
turns GRO on for the host's veths (which gives them NAPI), as a physical NIC has it by
default; without it a veth delivers every packet on its own and UDP_GRO has nothing to
coalesce. ``--strace`` runs one extra round per variant under ``strace -c -f`` and
divides the calls by the datagrams delivered (strace slows the proxy: only the counts
mean anything there). Writes benchmarks/results/udp_work.json.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

from portproxy.bench import tools  # noqa: E402
from portproxy.bench.paths import (GROUP, Running, docker_proxy_starter, find_docker_proxy, listening,  # noqa: E402
                                   portproxy_starter)
from portproxy.bench.procfs import cpu_seconds  # noqa: E402
from portproxy.bench.servers import SOCKPERF_UDP  # noqa: E402
from portproxy.bench.topology import reset_conntrack  # noqa: E402

METRICS_PORT = 9789
HOST_PORT = 9201
RR_PORT = 9112


def portproxy_from(tree: str, strace: str | None = None):
    """Start ``portproxy map`` with ``tree`` first on the path (optionally under strace -c)."""
    def start(topo, forwards) -> Running:
        specs = [f"{hp}:{topo.container_ip}:{tp}/{proto}" for hp, tp, proto in forwards]
        argv = [sys.executable, "-m", "portproxy", "map", *specs, "--log-level", "warning",
                "--metrics-addr", f"127.0.0.1:{METRICS_PORT}"]
        if strace:
            argv = ["strace", "-c", "-f", "-o", strace, *argv]
        env = {**os.environ, "PYTHONPATH": tree}
        # cwd: ``python -m`` puts the working directory ahead of PYTHONPATH.
        proc = topo.host.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tree,
                               **GROUP)
        assert proc.stdout is not None
        for _ in specs:
            if not proc.stdout.readline().startswith("ready"):
                proc.kill()
                raise RuntimeError(f"portproxy did not start: {proc.communicate()[1].strip()[-300:]}")
        pids = [proc.pid]
        if strace:
            time.sleep(0.3)
            pids = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        return Running([proc], pids)
    return start


def veth_gro(topo) -> None:
    """GRO on for the host's veths (the client's and the container's): NAPI with it."""
    from pyroute2 import Ethtool

    def on(dev: str) -> None:
        with Ethtool() as eth:
            features = eth.get_features(dev)
            features.features["rx-gro"].enable = True
            eth.set_features(dev, features)
    for dev in ("vout", topo.container_port):
        topo.host.run(on, dev)


def _rcvbuf_errors() -> int:
    lines = [line.split() for line in Path("/proc/thread-self/net/snmp").read_text().splitlines()
             if line.startswith("Udp:")]
    return int(dict(zip(lines[0], lines[1]))["RcvbufErrors"])


def drops(topo) -> dict[str, int]:
    """UDP receive-buffer overflows so far in the host (the proxy) and the container (the server)."""
    return {"host": topo.host.run(_rcvbuf_errors), "container": topo.container.run(_rcvbuf_errors),
            "client": topo.client.run(_rcvbuf_errors)}


def relayed_by_portproxy(topo, port: int) -> int | None:
    """Datagrams the proxy relayed on ``port`` (both ways), from its own exact counters."""
    import urllib.request

    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5) as response:
            return response.read().decode()
    try:
        text = topo.host.run(fetch)
    except OSError:
        return None  # not portproxy, or no userland counters (kernel path)
    total = 0
    for line in text.splitlines():
        if line.startswith("portproxy_udp_datagrams_total{") and f'listen="*:{port}"' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def one_run(topo, start, workload: str, seconds: float, sink=None) -> dict:
    reset_conntrack(topo)
    forwards = [(HOST_PORT, harness.IPERF_PORT, "tcp"), (HOST_PORT, harness.IPERF_PORT, "udp"),
                (RR_PORT, SOCKPERF_UDP.port, "udp"), (GSO_HOST_PORT, GSO_PORT, "udp")]
    running = listening(topo, forwards, start(topo, forwards))
    try:
        cpu0 = cpu_seconds(running.relay_pids)
        drops0 = drops(topo)
        if workload == "rr":
            out = tools.sockperf_ping_pong(topo.client, topo.host_ip, RR_PORT, seconds, tcp=False)
            return {**out, "cpu_s": cpu_seconds(running.relay_pids) - cpu0}
        reverse = workload in ("reverse", "gso-reverse")
        receiver = "client" if reverse else "container"
        if workload.startswith("gso"):
            out = gso_run(topo, sink, reverse, seconds)
            return _with_cpu(topo, running, cpu0, drops0, out, receiver, GSO_HOST_PORT)
        result = tools.iperf(topo.client, topo.host_ip, HOST_PORT, seconds, udp_rate="1G", length=1400,
                             reverse=workload == "reverse")
        s = result["end"]["sum"]
        sent, lost = s.get("packets", 0), s.get("lost_packets", 0)
        out = {"sent": sent, "delivered": sent - lost, "loss_percent": 100.0 * lost / sent if sent else 100.0}
        return _with_cpu(topo, running, cpu0, drops0, out, receiver, HOST_PORT)
    finally:
        running.stop()


def _with_cpu(topo, running: Running, cpu0: float, drops0: dict, out: dict, receiver: str, port: int) -> dict:
    """CPU per datagram delivered, and per datagram the relay handled (its counters where it
    has them, else delivered + the receiver's overflows); no CPU figure for the kernel path."""
    overflows = {k: v - drops0[k] for k, v in drops(topo).items()}
    relayed = relayed_by_portproxy(topo, port) if running.relay_pids else None
    if relayed is None:
        relayed = out["delivered"] + overflows[receiver]
    result = {**out, "overflows": overflows, "relayed": relayed}
    if running.relay_pids:
        cpu = cpu_seconds(running.relay_pids) - cpu0
        result.update(cpu_s=cpu, cpu_us_per_datagram=1e6 * cpu / out["delivered"] if out["delivered"] else None,
                      cpu_us_per_relayed=1e6 * cpu / relayed if relayed else None)
    return result


_STRACE_LINE = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


def strace_counts(path: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in Path(path).read_text().splitlines():
        m = _STRACE_LINE.match(line)
        if m and m.group(2) != "total":
            counts[m.group(2)] = int(m.group(1))
    return counts


# --- a QUIC-like load: runs of datagrams sent with UDP GSO, received with UDP_GRO ---------------
RUN = 16
"""Datagrams per GSO send (QUIC stacks send 10-64)."""


def gso_sender(host: str, port: int, rate_bps: float, seconds: float, reverse: bool) -> None:
    """Send numbered 1400-byte datagrams in GSO runs at ``rate_bps`` (forward), or ask the
    sink to send them back to us (reverse) and count what arrives; print a JSON line."""
    import json
    import socket
    import struct
    from portproxy.proxy.udpcmsg import RECV_SPACE, SOL_UDP, UDP_GRO, gro_size, segment_cmsg
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)
    sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    sock.connect((host, port))
    if reverse:
        sock.send(json.dumps({"rate": rate_bps, "seconds": seconds}).encode())
        print(json.dumps(_count(sock, seconds + 1.0, RECV_SPACE, gro_size)), flush=True)
        return
    print(json.dumps({"sent": _blast(sock, rate_bps, seconds, segment_cmsg, struct, None)}), flush=True)


def _blast(sock, rate_bps: float, seconds: float, segment_cmsg, struct, to) -> int:
    payload = bytearray(1400 * RUN)
    cmsg = [segment_cmsg(1400)]
    per_run = RUN * 1400 * 8 / rate_bps
    seq = 0
    start = time.monotonic()
    while (now := time.monotonic()) - start < seconds:
        for i in range(RUN):
            struct.pack_into("!Q", payload, i * 1400, seq + i)
        try:
            if to is None:
                sock.sendmsg([payload], cmsg)
            else:
                sock.sendmsg([payload], cmsg, 0, to)
            seq += RUN
        except OSError:
            pass
        delay = start + seq / RUN * per_run - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    time.sleep(0.3)
    sock.send(b"end") if to is None else sock.sendto(b"end", to)
    return seq


def _count(sock, seconds: float, space, gro_size) -> dict:
    buf = bytearray(65535)
    got = 0
    sock.settimeout(seconds + 5)
    deadline = time.monotonic() + seconds + 5
    while time.monotonic() < deadline:
        try:
            n, anc, _f, _a = sock.recvmsg_into([buf], space)
        except TimeoutError:
            break
        if n == 3 and bytes(buf[:3]) == b"end":
            break
        size = gro_size(anc) or n
        got += -(-n // size)
    return {"received": got}


def gso_sink(port: int) -> None:
    """In the container: count what a forward run sends, or blast a reverse run at the asker."""
    import json
    import socket
    import struct
    from portproxy.proxy.udpcmsg import RECV_SPACE, SOL_UDP, UDP_GRO, gro_size, segment_cmsg
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)
    sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    sock.bind(("0.0.0.0", port))
    buf = bytearray(65535)
    while True:
        n, anc, _f, addr = sock.recvmsg_into([buf], RECV_SPACE)
        if buf[:1] == b"{":
            ask = json.loads(bytes(buf[:n]))
            sent = _blast(sock, ask["rate"], ask["seconds"], segment_cmsg, struct, addr)
            print(json.dumps({"sent": sent}), flush=True)
            continue
        size = gro_size(anc) or n
        got = -(-n // size)
        sock.settimeout(10)
        while True:
            try:
                n, anc, _f, addr = sock.recvmsg_into([buf], RECV_SPACE)
            except TimeoutError:
                break
            if n == 3 and bytes(buf[:3]) == b"end":
                break
            size = gro_size(anc) or n
            got += -(-n // size)
        sock.settimeout(None)
        print(json.dumps({"received": got}), flush=True)


def gso_run(topo, sink, reverse: bool, seconds: float) -> dict:
    """One QUIC-like run through HOST_PORT+1 → GSO_PORT; sent and received datagrams."""
    import json
    argv = [sys.executable, __file__, "--gso-send", topo.host_ip, str(GSO_HOST_PORT), "1e9", str(seconds)]
    if reverse:
        argv.append("--reverse")
    proc = topo.client.popen(argv, stdout=subprocess.PIPE, text=True, env={**os.environ})
    out, _ = proc.communicate(timeout=seconds + 30)
    mine = json.loads(out.strip().splitlines()[-1])
    theirs = json.loads(sink.stdout.readline())
    sent, received = (theirs["sent"], mine["received"]) if reverse else (mine["sent"], theirs["received"])
    return {"sent": sent, "delivered": received, "loss_percent": 100.0 * (sent - received) / sent if sent else 100.0}


GSO_PORT = 9300
GSO_HOST_PORT = 9301


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--gso-send":
        gso_sender(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), "--reverse" in sys.argv)
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--gso-sink":
        gso_sink(int(sys.argv[2]))
        return 0
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variant", action="append", default=[], help="NAME=PYTHONPATH")
    parser.add_argument("--docker-proxy", action="store_true")
    parser.add_argument("--kernel", action="store_true", help="the kernel path (nftables DNAT) beside")
    parser.add_argument("--veth-gro", action="store_true")
    parser.add_argument("--strace", action="store_true")
    parser.add_argument("--workload", action="append", default=[],
                        choices=["forward", "reverse", "rr", "gso-forward", "gso-reverse"])
    parser.add_argument("--out", default="udp_work")
    args = parser.parse_args()
    variants = dict(v.split("=", 1) for v in args.variant) or {"tree": str(Path(__file__).resolve().parent.parent)}
    workloads = args.workload or ["forward", "reverse", "rr", "gso-forward", "gso-reverse"]
    starters = {name: portproxy_from(tree) for name, tree in variants.items()}
    if args.kernel:
        starters["kernel"] = portproxy_starter(kernel=True)
    if args.docker_proxy:
        binary = find_docker_proxy()
        if not binary:
            print("docker-proxy is not available", file=sys.stderr)
            return 1
        starters["docker-proxy"] = docker_proxy_starter(binary)
    runs: dict[str, dict[str, list[dict]]] = {w: {name: [] for name in starters} for w in workloads}
    syscalls: dict[str, dict] = {}
    with harness.topology("ppudpw") as topo, harness.container_servers(topo):
        sink = topo.container.popen([sys.executable, __file__, "--gso-sink", str(GSO_PORT)], stdout=subprocess.PIPE,
                                    text=True)
        try:
            if args.veth_gro:
                veth_gro(topo)
            for r in range(args.rounds):
                for workload in workloads:
                    order = list(starters) if r % 2 == 0 else list(reversed(starters))
                    for name in order:
                        result = one_run(topo, starters[name], workload, args.seconds, sink)
                        runs[workload][name].append(result)
                        print(f"round {r} {workload} {name}: {result}", flush=True)
            if args.strace:
                for name, tree in variants.items():
                    for workload in [w for w in workloads if w != "rr"]:
                        with tempfile.NamedTemporaryFile(prefix="udpw-strace-", suffix=".txt", delete=False) as f:
                            out = f.name
                        result = one_run(topo, portproxy_from(tree, out), workload, args.seconds, sink)
                        counts = strace_counts(out)
                        os.unlink(out)
                        per = {k: v / result["relayed"] for k, v in counts.items() if result["relayed"]}
                        syscalls[f"{workload} {name}"] = {"relayed": result["relayed"], "calls": counts,
                                                          "per_datagram": per}
                        top = sorted(per.items(), key=lambda kv: -kv[1])[:8]
                        print(f"strace {workload} {name}: relayed {result['relayed']}, per datagram relayed "
                              + ", ".join(f"{k} {v:.3f}" for k, v in top) + f", total {sum(per.values()):.3f}",
                              flush=True)
        finally:
            sink.kill()
            sink.wait()
    summary: dict[str, dict[str, dict]] = {}
    for workload, by_name in runs.items():
        summary[workload] = {}
        keys = ("p50_us", "p99_us", "cpu_s") if workload == "rr" else (
            "cpu_us_per_datagram", "cpu_us_per_relayed", "loss_percent", "delivered", "relayed")
        for name, results in by_name.items():
            summary[workload][name] = {}
            for key in keys:
                values = [x[key] for x in results if x.get(key) is not None]
                if values:
                    summary[workload][name][key] = {"median": statistics.median(values), "min": min(values),
                                                    "max": max(values)}
    for workload, by_name in summary.items():
        print(f"\n{workload}:")
        for name, metrics in by_name.items():
            print(f"  {name}: " + ", ".join(f"{k} {v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f})"
                                             for k, v in metrics.items()))
    path = harness.write_result(args.out, {"args": vars(args), "runs": runs, "summary": summary, "syscalls": syscalls})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
