"""Spike: established TCP connections moved by an eBPF sockmap redirect instead of splice.

Two parts in one file:

``relay`` (run inside the host namespace by the driver): a minimal TCP relay. It accepts a
connection, connects to the target, and joins the two sockets in a sockmap whose SK_SKB
stream-verdict program (``sockmap_bpf``) redirects every skb one socket receives to the
other's egress and counts its bytes per socket cookie. From then on the process is not
woken for data at all: each socket is in its epoll set for ``EPOLLRDHUP`` only (plus the
always-reported ``EPOLLERR``/``EPOLLHUP``), so it hears only of a FIN or a reset.

* **FIN.** A FIN from A is not an skb the program sees with data; A's ``EPOLLRDHUP``
  says it came. The relay must not forward it at once: the kernel queues redirected skbs
  on the peer's psock and sends them from a workqueue, so bytes may still be on their way
  to B. It forwards the FIN (``shutdown(B, SHUT_WR)``) only once A's receive queue is empty
  (``FIONREAD``) and B has taken every byte the program counted for A
  (``tcpi_bytes_acked + SIOCOUTQ`` of B == the counter), polling with a back-off.
* **RST.** ``EPOLLERR`` with ``SO_ERROR`` set on A: B is closed with ``SO_LINGER 0`` (a
  reset), so a reset goes on as a reset.
* **The end.** Both directions' FINs forwarded: both sockets are closed (closing takes
  them out of the sockmap) and the counters are added to the totals the relay prints on
  SIGTERM as one JSON line.
* **Bytes that came before the join** (the client may send before ``accept`` returns)
  sit in the receive queue where no verdict will see them until the next skb: the relay
  reads them itself once after the join and writes them to the peer. (Bytes arriving
  during that read could overtake them; a production version would join the sockets from
  a sock_ops program at establishment instead.)

``run`` (the default; root): builds the benchmark topology in namespaces of its own
(``portproxy.bench.topology``: client → host → container), starts iperf3 and three small
servers in the container, the splice relay (``portproxy map``) and this sockmap relay in
the host, and measures both side by side, interleaved, several rounds: throughput,
whole-machine and relay CPU-s per GB, byte integrity both ways with a half-close, a slow
reader's memory, reset propagation. Everything is removed at the end, even on failure;
the root namespace is never touched.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/sockmap_spike.py [--rounds 5] [--seconds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sockmap_bpf  # noqa: E402

# --- the relay ---------------------------------------------------------------------------
TCP_INFO_BYTES_ACKED = 120  # offsetof(struct tcp_info, tcpi_bytes_acked)
SIOCOUTQ = termios.TIOCOUTQ
SIOCINQ = termios.FIONREAD


def _int_ioctl(sock: socket.socket, request: int) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0]


def taken(sock: socket.socket) -> int:
    """Bytes written into this socket so far: acknowledged + still in its write queue.
    Read acked first: an ACK between the two reads can only make the sum smaller."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    acked = struct.unpack_from("<Q", info, TCP_INFO_BYTES_ACKED)[0]
    return acked + _int_ioctl(sock, SIOCOUTQ)


def cookie(sock: socket.socket) -> int:
    return struct.unpack("<Q", sock.getsockopt(socket.SOL_SOCKET, sockmap_bpf.SO_COOKIE, 8))[0]


class Side:
    """One socket of a relayed pair."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.cookie = cookie(sock)
        self.flushed = 0  # bytes this relay read itself and wrote to the peer
        self.eof = False  # its FIN came
        self.done = False  # its FIN has been forwarded to the peer
        self.wait = 0.0005
        self.next_check = 0.0


class Pair:
    def __init__(self, kernel: sockmap_bpf.SockmapRelayKernel, a: socket.socket, b: socket.socket) -> None:
        self.kernel = kernel
        self.a, self.b = Side(a), Side(b)
        self.id = kernel.insert(a.fileno(), self.a.cookie, b.fileno(), self.b.cookie)

    def peer(self, side: Side) -> Side:
        return self.b if side is self.a else self.a

    def received(self, side: Side) -> int:
        return self.kernel.received(side.cookie) + side.flushed

    def flush_early_bytes(self) -> None:
        for side in (self.a, self.b):
            while True:
                try:
                    data = side.sock.recv(1 << 16, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                if not data:
                    break
                self.peer(side).sock.sendall(data)
                side.flushed += len(data)

    def drained(self, side: Side) -> bool:
        """Has every byte ``side`` received reached its peer's socket?"""
        return _int_ioctl(side.sock, SIOCINQ) == 0 and taken(self.peer(side).sock) >= self.received(side)


class Relay:
    def __init__(self, maps: list[tuple[int, str, int]], nodelay: bool = True) -> None:
        self.nodelay = nodelay
        self.kernel = sockmap_bpf.SockmapRelayKernel()
        self.verbose = bool(os.environ.get("SOCKMAP_RELAY_VERBOSE"))
        self.epoll = select.epoll()
        self.listeners: dict[int, tuple[socket.socket, tuple[str, int]]] = {}
        self.sides: dict[int, tuple[Pair, Side]] = {}
        self.draining: list[tuple[Pair, Side]] = []
        self.totals = {"connections": 0, "resets": 0, "bytes_a_to_b": 0, "bytes_b_to_a": 0, "early_bytes": 0}
        for port, host, tport in maps:
            lst = socket.create_server(("0.0.0.0", port), backlog=1024)
            lst.setblocking(False)
            self.listeners[lst.fileno()] = (lst, (host, tport))
            self.epoll.register(lst.fileno(), select.EPOLLIN)

    def accept(self, fd: int) -> None:
        lst, target = self.listeners[fd]
        try:
            client, _ = lst.accept()
        except BlockingIOError:
            return
        try:
            up = socket.create_connection(target, timeout=5)
        except OSError:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            return
        for s in (client, up):
            s.setblocking(True)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(self.nodelay))
        try:
            pair = Pair(self.kernel, client, up)
        except OSError:  # a socket no longer established cannot join the sockmap
            for s in (client, up):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
            self.totals["resets"] += 1
            return
        self.totals["connections"] += 1
        try:
            pair.flush_early_bytes()
        except OSError:  # reset before the join was complete: pass the reset on
            self.reset(pair)
            return
        for side in (pair.a, pair.b):
            self.sides[side.sock.fileno()] = (pair, side)
            self.epoll.register(side.sock.fileno(), select.EPOLLRDHUP)

    def event(self, fd: int, mask: int) -> None:
        pair, side = self.sides[fd]
        err = side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if mask & (select.EPOLLERR | select.EPOLLHUP) else 0
        if err:
            if self.verbose:
                print(f"sockmap relay: reset, {'client' if side is pair.a else 'target'} side: "
                      f"{os.strerror(err)} (mask {mask:#x})", file=sys.stderr, flush=True)
            self.reset(pair)
        elif mask & select.EPOLLRDHUP and not side.eof:
            side.eof = True
            # Edge-triggered from now on: only a later error is news.
            self.epoll.modify(fd, select.EPOLLRDHUP | select.EPOLLET)
            self.draining.append((pair, side))

    def check_drains(self) -> float:
        """Forward the FINs whose bytes have all arrived; the seconds until the next check."""
        now = time.monotonic()
        soonest = -1.0
        for pair, side in list(self.draining):
            if side.next_check > now:
                pass
            elif pair.drained(side):
                if self.verbose:
                    print(f"sockmap relay: FIN on from {'client' if side is pair.a else 'target'}: "
                          f"counted {pair.kernel.received(side.cookie)} + flushed {side.flushed}, "
                          f"peer took {taken(pair.peer(side).sock)}, inq {_int_ioctl(side.sock, SIOCINQ)}",
                          file=sys.stderr, flush=True)
                self.draining.remove((pair, side))
                with contextlib.suppress(OSError):
                    pair.peer(side).sock.shutdown(socket.SHUT_WR)
                side.done = True
                if pair.a.done and pair.b.done:
                    self.close(pair)
                continue
            else:
                side.next_check = now + side.wait
                side.wait = min(side.wait * 2, 0.05)
            left = side.next_check - now
            soonest = left if soonest < 0 else min(soonest, left)
        return soonest

    def reset(self, pair: Pair) -> None:
        self.totals["resets"] += 1
        for side in (pair.a, pair.b):
            with contextlib.suppress(OSError):
                side.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close(pair)

    def close(self, pair: Pair) -> None:
        self.totals["bytes_a_to_b"] += pair.received(pair.a)
        self.totals["bytes_b_to_a"] += pair.received(pair.b)
        self.totals["early_bytes"] += pair.a.flushed + pair.b.flushed
        self.draining = [(p, s) for p, s in self.draining if p is not pair]
        for side in (pair.a, pair.b):
            fd = side.sock.fileno()
            if fd >= 0:
                with contextlib.suppress(OSError):
                    self.epoll.unregister(fd)
                self.sides.pop(fd, None)
        self.kernel.remove(pair.id, pair.a.cookie, pair.b.cookie)
        pair.a.sock.close()
        pair.b.sock.close()

    def run(self) -> None:
        print("ready", flush=True)
        timeout = -1.0
        while True:
            for fd, mask in self.epoll.poll(timeout):
                if fd in self.listeners:
                    self.accept(fd)
                elif fd in self.sides:
                    self.event(fd, mask)
            timeout = self.check_drains()


def relay_main(args: argparse.Namespace) -> int:
    maps = []
    for spec in args.map:
        port, host, tport = spec.rsplit(":", 2) if spec.count(":") == 2 else (None, None, None)
        if port is None:
            print(f"sockmap relay: {spec!r} is not LISTEN_PORT:TARGET_IP:TARGET_PORT", file=sys.stderr)
            return 2
        maps.append((int(port), host, int(tport)))
    try:
        relay = Relay(maps, nodelay=args.nodelay)
    except OSError as exc:
        print(f"sockmap relay: cannot set up: {exc}", file=sys.stderr)
        return 1

    def stop(*_: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        relay.run()
    finally:
        print(json.dumps(relay.totals), flush=True)
    return 0


# --- the driver --------------------------------------------------------------------------
MiB = 1 << 20
PAYLOAD = b""  # what the servers send (64 MiB, made by run_main); the clients send their own
PAYLOAD_SHA = b""
IPERF_PORT, ECHO_PORT, FIREHOSE_PORT, RST_PORT = 5201, 7100, 7101, 7102
FIREHOSE_BYTES = 16 * 64 * MiB  # 1 GiB
SERVICES = (IPERF_PORT, ECHO_PORT, FIREHOSE_PORT, RST_PORT)
PATHS = {"splice": 9000, "sockmap": 9100, "sockmap-nagle": 9200}
"""Host port base of each relay (base + i publishes SERVICES[i]). ``sockmap-nagle``: the
sockmap relay without TCP_NODELAY (the splice relay sets it), in case the workqueue's
one send per skb suffers from it."""


def _serve(listener: socket.socket, handle) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def echo_digest(conn: socket.socket) -> None:
    """Read to EOF, answer the sha256 of what came, then PAYLOAD, then close (the client
    must still read after its own shutdown: a half-close)."""
    h = hashlib.sha256()
    with conn:
        while data := conn.recv(1 << 18):
            h.update(data)
        conn.sendall(h.digest())
        conn.sendall(PAYLOAD)


FIREHOSE_SENT = [0]


def firehose(conn: socket.socket) -> None:
    """Send FIREHOSE_BYTES (PAYLOAD repeated 16 times) as fast as the path takes them, counting."""
    FIREHOSE_SENT[0] = 0
    view = memoryview(PAYLOAD)
    with conn, contextlib.suppress(OSError):
        for _ in range(FIREHOSE_BYTES // len(PAYLOAD)):
            for off in range(0, len(view), 1 << 16):
                conn.sendall(view[off:off + (1 << 16)])
                FIREHOSE_SENT[0] += 1 << 16


RST_SEEN: dict[str, str] = {}


def rst_server(conn: socket.socket) -> None:
    """First byte 'C': the client will reset; report what the server sees. 'S': the
    server resets after reading 1 KiB."""
    with conn:
        mode = conn.recv(1)
        got = len(mode)
        while got < 1024:
            got += len(conn.recv(1024 - got + 1))
        if mode == b"S":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        conn.settimeout(5)
        try:
            RST_SEEN["server"] = "EOF (FIN)" if conn.recv(1) == b"" else "data"
        except ConnectionResetError:
            RST_SEEN["server"] = "RST"
        except socket.timeout:
            RST_SEEN["server"] = "nothing within 5 s"


def start_servers(topo) -> list[socket.socket]:
    listeners = []
    for port, handle in ((ECHO_PORT, echo_digest), (FIREHOSE_PORT, firehose), (RST_PORT, rst_server)):
        lst = topo.container.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("0.0.0.0", port))
        lst.listen(64)
        listeners.append(lst)
        threading.Thread(target=_serve, args=(lst, handle), daemon=True).start()
    return listeners


def connect(topo, port: int) -> socket.socket:
    s = topo.client.socket()
    s.settimeout(60)
    s.connect((topo.host_ip, port))
    return s


def check_integrity(topo, port: int) -> dict:
    """Send 64 MiB, shut down writing, read the server's digest and 64 MiB reply."""
    mine = os.urandom(64 * MiB)
    s = connect(topo, port)
    t0 = time.monotonic()
    with s:
        s.sendall(mine)
        s.shutdown(socket.SHUT_WR)
        h = hashlib.sha256()
        digest = b""
        n = 0
        while data := s.recv(1 << 18):
            if len(digest) < 32:
                take = 32 - len(digest)
                digest += data[:take]
                data = data[take:]
            h.update(data)
            n += len(data)
    return {"upload_intact": digest == hashlib.sha256(mine).digest(),
            "reply_after_half_close_intact": n == len(PAYLOAD) and h.digest() == PAYLOAD_SHA,
            "reply_bytes": n, "seconds": round(time.monotonic() - t0, 2)}


def ns_read(ns, path: str) -> str:
    return ns.run(lambda: Path(path).read_text())


def tcp_mem_pages(topo) -> int:
    for line in ns_read(topo.host, "/proc/net/sockstat").splitlines():
        if line.startswith("TCP:"):
            f = line.split()
            return int(f[f.index("mem") + 1])
    return -1


def host_skmem(topo) -> dict[str, int]:
    """Sum of the host namespace's TCP sockets' skmem (the relays' sockets): rmem_alloc
    (r), wmem_alloc (t), wmem_queued (w), in bytes."""
    out = topo.host.popen(["ss", "-tmnH"], stdout=subprocess.PIPE, text=True).communicate(timeout=10)[0]
    total = {"r": 0, "t": 0, "w": 0}
    for part in out.split("skmem:(")[1:]:
        for item in part.split(")")[0].split(","):
            key = item.rstrip("0123456789")
            if key in total:
                total[key] += int(item[len(key):])
    return total


def mem_available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return -1


def check_slow_reader(topo, port: int, stall: float = 8.0) -> dict:
    """A client that reads nothing for ``stall`` s from a server sending 1 GiB: how much
    did the server get rid of, what do the host's sockets hold (charged socket memory),
    and how much memory did the whole machine lose meanwhile? Then read it all."""
    before, avail = tcp_mem_pages(topo), mem_available_kib()
    s = connect(topo, port)
    with s:
        time.sleep(stall)
        held = {"server_sent_MiB": round(FIREHOSE_SENT[0] / MiB, 1),
                "machine_MemAvailable_drop_MiB": round((avail - mem_available_kib()) / 1024, 1),
                "tcp_mem_MiB_delta": round((tcp_mem_pages(topo) - before) * 4096 / MiB, 1),
                "host_sockets_skmem_MiB": {k: round(v / MiB, 1) for k, v in host_skmem(topo).items()}}
        h = hashlib.sha256()
        n = 0
        while data := s.recv(1 << 18):
            h.update(data)
            n += len(data)
    expect = hashlib.sha256()
    for _ in range(FIREHOSE_BYTES // len(PAYLOAD)):
        expect.update(PAYLOAD)
    return {**held, "all_bytes_intact": n == FIREHOSE_BYTES and h.digest() == expect.digest()}


def check_resets(topo, port: int) -> dict:
    RST_SEEN.clear()
    s = connect(topo, port)
    s.sendall(b"C" + b"x" * 1023)
    time.sleep(0.3)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    deadline = time.monotonic() + 7
    while "server" not in RST_SEEN and time.monotonic() < deadline:
        time.sleep(0.05)
    s = connect(topo, port)
    s.settimeout(5)
    with s:
        s.sendall(b"S" + b"x" * 1023)
        try:
            client = "EOF (FIN)" if s.recv(1) == b"" else "data"
        except ConnectionResetError:
            client = "RST"
        except socket.timeout:
            client = "nothing within 5 s"
    return {"client_reset_seen_by_server": RST_SEEN.get("server", "nothing"),
            "server_reset_seen_by_client": client}


def iperf_run(topo, port: int, seconds: float, parallel: int, reverse: bool, pid: int) -> dict:
    from portproxy.bench.procfs import cpu_seconds, machine_busy_seconds
    from portproxy.bench.tools import iperf, tcp_stream
    m0, r0 = machine_busy_seconds(), cpu_seconds([pid])
    result = iperf(topo.client, topo.host_ip, port, seconds, parallel=parallel, reverse=reverse)
    m1, r1 = machine_busy_seconds(), cpu_seconds([pid])
    gbit, received = tcp_stream(result)
    gb = received / 1e9
    return {"gbit_s": gbit, "machine_cpu_s_per_gb": (m1 - m0) / gb, "relay_cpu_s_per_gb": (r1 - r0) / gb}


WORKLOADS = {"tcp-1": (1, False), "tcp-4": (4, False), "tcp-1-down": (1, True)}


def start_relays(topo, paths: list[str]) -> dict[str, subprocess.Popen]:
    target = topo.container_ip
    def sockmap(path: str, *extra: str) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "relay", *extra,
                *(arg for i, p in enumerate(SERVICES) for arg in ("--map", f"{PATHS[path] + i}:{target}:{p}"))]

    argv = {
        "splice": [sys.executable, "-m", "portproxy", "map", "--log-level", "error",
                   *(f"{PATHS['splice'] + i}:{target}:{p}" for i, p in enumerate(SERVICES))],
        "sockmap": sockmap("sockmap"),
        "sockmap-nagle": sockmap("sockmap-nagle", "--no-nodelay"),
    }
    procs: dict[str, subprocess.Popen] = {}
    for name in paths:
        cmd = argv[name]
        proc = topo.host.popen(cmd, stdout=subprocess.PIPE, text=True)
        procs[name] = proc
        line = proc.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"{name} relay did not start: {line!r}")
    return procs


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def run_main(args: argparse.Namespace) -> int:
    from portproxy import debcache
    from portproxy.bench.topology import bench_topology
    global PAYLOAD, PAYLOAD_SHA
    PAYLOAD = os.urandom(64 * MiB)
    PAYLOAD_SHA = hashlib.sha256(PAYLOAD).digest()
    results: dict = {"throughput": {}, "checks": {}}
    paths = args.paths.split(",")
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        print(f"sockmap_spike: unknown path(s) {', '.join(unknown)}; known: {', '.join(PATHS)}", file=sys.stderr)
        return 2
    raw: dict[str, dict[str, list[dict]]] = {w: {p: [] for p in paths} for w in WORKLOADS}
    with bench_topology("ppsock") as topo:
        iperf3 = topo.container.popen([*debcache.command("iperf3"), "-s", "-p", str(IPERF_PORT)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        listeners = start_servers(topo)
        procs: dict[str, subprocess.Popen] = {}
        try:
            procs = start_relays(topo, paths)
            time.sleep(0.5)
            order = list(paths)
            for round_ in range(args.rounds if not args.checks_only else 0):
                for workload, (parallel, reverse) in WORKLOADS.items():
                    for path in order:
                        r = iperf_run(topo, PATHS[path], args.seconds, parallel, reverse, procs[path].pid)
                        raw[workload][path].append(r)
                        print(f"round {round_ + 1} {workload} {path}: {r['gbit_s']:.2f} Gbit/s, machine "
                              f"{r['machine_cpu_s_per_gb']:.3f} CPU-s/GB, relay {r['relay_cpu_s_per_gb']:.3f}",
                              file=sys.stderr, flush=True)
                order = order[1:] + order[:1]
            for path in paths:
                base = PATHS[path]
                checks = {"integrity_half_close": [check_integrity(topo, base + 1) for _ in range(2)],
                          "slow_reader": check_slow_reader(topo, base + 2),
                          "resets": check_resets(topo, base + 3)}
                results["checks"][path] = checks
                print(f"{path}: {json.dumps(checks)}", file=sys.stderr, flush=True)
        finally:
            for name, proc in procs.items():
                proc.terminate()
                try:
                    out = proc.communicate(timeout=20)[0]
                except subprocess.TimeoutExpired:
                    proc.kill()
                    out = proc.communicate()[0]
                results.setdefault("relay_exit", {})[name] = out.strip().splitlines()[-1:] if out else []
            iperf3.terminate()
            iperf3.wait(timeout=10)
            for lst in listeners:
                lst.close()
    for workload, paths in raw.items():
        results["throughput"][workload] = {
            path: {k: summarize([r[k] for r in runs]) for k in runs[0]} for path, runs in paths.items() if runs}
    results["raw"] = raw
    results["time"] = time.strftime("%Y-%m-%d %H:%M:%S")
    results["rounds"], results["seconds"] = args.rounds, args.seconds
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(render(results))
    return 0


def render(results: dict) -> str:
    lines = ["| workload | path | Gbit/s median (min–max) | machine CPU-s/GB | relay CPU-s/GB |",
             "|---|---|---:|---:|---:|"]
    for workload, paths in results["throughput"].items():
        for path, s in paths.items():
            g, m, r = s["gbit_s"], s["machine_cpu_s_per_gb"], s["relay_cpu_s_per_gb"]
            lines.append(f"| {workload} | {path} | {g['median']:.2f} ({g['min']:.2f}–{g['max']:.2f}) | "
                         f"{m['median']:.3f} ({m['min']:.3f}–{m['max']:.3f}) | "
                         f"{r['median']:.3f} ({r['min']:.3f}–{r['max']:.3f}) |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    relay = sub.add_parser("relay", help="run the sockmap relay (in the current namespace)")
    relay.add_argument("--map", action="append", required=True, metavar="LISTEN_PORT:TARGET_IP:TARGET_PORT")
    relay.add_argument("--nodelay", action=argparse.BooleanOptionalAction, default=True,
                       help="TCP_NODELAY on both sockets (default on, as the splice relay does)")
    run = sub.add_parser("run", help="measure splice against sockmap in namespaces of its own (default)")
    for p in (parser, run):
        p.add_argument("--rounds", type=int, default=5)
        p.add_argument("--seconds", type=float, default=5)
        p.add_argument("--paths", default=",".join(PATHS), help="comma-separated, of: " + ", ".join(PATHS))
        p.add_argument("--checks-only", action="store_true", help="skip the throughput runs")
        p.add_argument("--out", type=Path, default=Path("benchmarks/results/sockmap_spike.json"))
    args = parser.parse_args()
    if args.cmd == "relay":
        return relay_main(args)
    if os.geteuid() != 0:
        print("sockmap_spike: needs root (namespaces, BPF)", file=sys.stderr)
        return 1
    return run_main(args)


if __name__ == "__main__":
    sys.exit(main())
