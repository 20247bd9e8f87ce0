"""``portproxy demo``: a container's port published on every path, in namespaces of its own.

The demo builds a client, a host with a bridge and a container in namespaces of its
own (the root namespace is never touched; see :mod:`portproxy.lab.topology`), serves
HTTP in the "container", publishes 9090 → 172.16.1.1:8080 with portproxy on the
userland and the kernel path, switches paths under a running download, fetches
pages through it from the client, the host and the container, then removes everything.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import socket
import tempfile
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from ..schema import MODES
from .namespaces import Namespace
from .topology import DemoTopology, demo_topology

DEMO_SPEC = "9090:172.16.1.1:8080"
PAGE = b"<html><body><h1>hello from the container at 172.16.1.1:8080</h1></body></html>\n"


STREAM_CHUNKS = 400
STREAM_CHUNK = 64 * 1024


def stream_chunk(i: int) -> bytes:
    """Deterministic content of chunk ``i`` of /stream, so the client can verify every byte."""
    return hashlib.sha256(b"%d" % i).digest() * (STREAM_CHUNK // 32)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/stream":
            # A slow 25 MiB download (about 8 s), long enough to switch paths under it.
            self.send_response(200)
            self.send_header("Content-Length", str(STREAM_CHUNKS * STREAM_CHUNK))
            self.end_headers()
            for i in range(STREAM_CHUNKS):
                self.wfile.write(stream_chunk(i))
                time.sleep(0.02)
            return
        body = PAGE + f"your address as the container sees it: {self.client_address[0]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def start_http_server(ns: Namespace, port: int) -> http.server.ThreadingHTTPServer:
    """An HTTP server listening inside ``ns``, served from a background thread."""
    server = http.server.ThreadingHTTPServer(("0.0.0.0", port), _Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.server_bind()
    server.server_activate()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def http_get(ns: Namespace, host: str, port: int, timeout: float = 5.0, path: str = "/") -> tuple[str, bytes]:
    """GET ``path`` from inside ``ns``; return (status line, body)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = ns.socket(family, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0].decode(), body


def start_portproxy(ns: Namespace, args: list[str]) -> tuple[subprocess.Popen, list[str]]:
    """Run ``portproxy ARGS`` inside ``ns``; return once it printed its ready lines."""
    proc = ns.popen([sys.executable, "-m", "portproxy", *args], stdout=subprocess.PIPE, text=True)
    ready: list[str] = []
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("ready"):
        proc.wait(timeout=5)
        raise RuntimeError(f"portproxy did not start (exit {proc.returncode})")
    ready.append(line.strip())
    return proc, ready


def stop_portproxy(proc: subprocess.Popen) -> int:
    proc.terminate()
    try:
        return proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def _say(text: str) -> None:
    print(text, flush=True)


def _fetch_all(topo: DemoTopology, who: list[tuple[str, Namespace, str]]) -> None:
    for name, ns, addr in who:
        t0 = time.monotonic()
        status, body = http_get(ns, addr, 9090)
        ms = (time.monotonic() - t0) * 1000
        _say(f"{name:>9} GET http://{addr}:9090/ -> {status} ({len(body)} bytes, {ms:.1f} ms)")
        _say("          " + body.decode().strip().splitlines()[-1])


def _kernel_counters(topo: DemoTopology) -> str:
    from ..kernel.builders import KernelOptions
    from ..kernel.executor import Nft
    from ..kernel.path import read_counters

    c = topo.host.run(lambda: read_counters(Nft(), KernelOptions()))[1]
    return f"{c.connections} connections, {c.packets} packets, {c.bytes} bytes (both directions)"


def _series(topo: DemoTopology) -> list[str]:
    """The mapping's connection and byte series, scraped from portproxy's metrics endpoint."""
    def scrape() -> str:
        import urllib.request

        with urllib.request.urlopen("http://127.0.0.1:9779/metrics", timeout=5) as response:
            return response.read().decode()

    wanted = ("portproxy_connections_total{", "portproxy_bytes_total{")
    return [line for line in topo.host.run(scrape).splitlines() if line.startswith(wanted)]


def _show_series(topo: DemoTopology, when: str) -> None:
    _say(f"  metrics {when}:")
    for line in _series(topo):
        _say(f"    {line}")


def _userland(topo: DemoTopology, loop: str) -> None:
    _say(f"\n-- userland path: portproxy map {DEMO_SPEC} --metrics-addr (splice, {loop}) --")
    proc, ready = start_portproxy(topo.host, ["map", DEMO_SPEC, "--loop", loop, "--drain-timeout", "1",
                                              "--log-level", "warning", "--metrics-addr"])
    try:
        for line in ready:
            _say(line)
        _show_series(topo, "before traffic")
        _fetch_all(topo, [("client", topo.client, topo.host_ip), ("host", topo.host, "127.0.0.1")])
        _say("          (a proxy: the container sees the host's bridge address, not the client's;"
             " the last scene changes that)")
        _show_series(topo, "after two fetches")
    finally:
        _say(f"portproxy stopped on SIGTERM (exit {stop_portproxy(proc)})")


def _kernel(topo: DemoTopology) -> None:
    _say(f"\n-- kernel path: portproxy map --mode kernel {DEMO_SPEC} --metrics-addr (nftables DNAT) --")
    proc, ready = start_portproxy(topo.host, ["map", "--mode", "kernel", DEMO_SPEC, "--log-level", "warning",
                                              "--metrics-addr"])
    try:
        for line in ready:
            _say(line)
        _show_series(topo, "before traffic")
        _fetch_all(topo, [
            ("client", topo.client, topo.host_ip),
            ("host", topo.host, topo.host_ip),
            ("container", topo.container, topo.host_ip),
        ])
        _say("          (DNAT keeps the client's address; the host and the hairpinned container are masqueraded)")
        _say(f"kernel counters of {DEMO_SPEC}: {_kernel_counters(topo)}")
        _show_series(topo, "after three fetches")
    finally:
        _say(f"portproxy stopped on SIGTERM (exit {stop_portproxy(proc)}); its nftables table is gone")


@contextlib.contextmanager
def _daemon(topo: DemoTopology, loop: str, config_text: str, stopped: str = "") -> Iterator[tuple[str, str]]:
    """``portproxy serve`` in the host namespace with ``config_text``: yields (its control
    socket, its ready line); stopped (and said so) at the end."""
    with tempfile.TemporaryDirectory(prefix="portproxy-demo-") as tmp:
        config = Path(tmp) / "portproxy.toml"
        config.write_text(config_text)
        sock = str(Path(tmp) / "portproxy.sock")
        proc, ready = start_portproxy(topo.host, ["serve", "--config", str(config), "--state-dir", tmp,
                                                  "--socket", sock, "--loop", loop, "--log-level", "warning",
                                                  "--metrics-addr", "off"])
        try:
            yield sock, ready[0]
        finally:
            _say(f"portproxy serve stopped on SIGTERM (exit {stop_portproxy(proc)}){stopped}")


def _switching(topo: DemoTopology, loop: str) -> None:
    _say(f"\n-- live switching: portproxy serve, {DEMO_SPEC} switched while a download runs --")
    with _daemon(topo, loop, f'[[mapping]]\nspec = "{DEMO_SPEC}"\nmode = "userland"\n') as (sock, ready):
        _say(ready)
        result: dict[str, object] = {}

        def download() -> None:
            t0 = time.monotonic()
            status, body = http_get(topo.client, topo.host_ip, 9090, timeout=30, path="/stream")
            result.update(status=status, body=body, seconds=time.monotonic() - t0)

        downloader = threading.Thread(target=download)
        downloader.start()
        during = 0
        for mode in ("kernel", "hybrid", "userland", "kernel", "userland"):
            time.sleep(0.5)
            switch = subprocess.run([sys.executable, "-m", "portproxy", "switch", "9090", "--mode", mode,
                                     "--socket", sock], capture_output=True, text=True, timeout=30)
            _say(f"  switch -> {mode:<8} {(switch.stdout or switch.stderr).strip()}")
            status, _ = http_get(topo.client, topo.host_ip, 9090)
            _say(f"  a new connection now: {status}")
            during += downloader.is_alive()
        downloader.join()
        body = result.get("body", b"")
        expected = b"".join(stream_chunk(i) for i in range(STREAM_CHUNKS))
        verdict = "every byte intact" if body == expected else "CORRUPTED OR INCOMPLETE"
        _say(f"download started on userland and ran through {during} switches: "
             f"{len(body)} bytes in {result.get('seconds', 0):.1f} s, {verdict}")  # type: ignore[arg-type]
        listing = subprocess.run([sys.executable, "-m", "portproxy", "ls", "--socket", sock],
                                 capture_output=True, text=True, timeout=30)
        _say(listing.stdout.rstrip())


def _client_address(topo: DemoTopology, loop: str) -> None:
    _say(f"\n-- the client's address on every path: {DEMO_SPEC} with source = \"client\" (transparent mode) --")
    with _daemon(topo, loop, f'[[mapping]]\nspec = "{DEMO_SPEC}"\nsource = "client"\n',
                 "; its ip rule and routes are gone") as (sock, _ready):
        for i, mode in enumerate((*MODES, MODES[0])):  # every path, then back
            if i:  # it starts on the default path, the first
                subprocess.run([sys.executable, "-m", "portproxy", "switch", "9090", "--mode", mode,
                                "--socket", sock], capture_output=True, text=True, timeout=30, check=True)
            _, body = http_get(topo.client, topo.host_ip, 9090)
            _say(f"  {mode:<8} the container sees: {body.decode().strip().splitlines()[-1].rsplit(' ', 1)[-1]}")
        _say(f"  (the client is {topo.client_ip}: the proxy connects from its address, DNAT keeps it)")


def run_demo(loop: str = "uvloop") -> int:
    with demo_topology("ppdemo") as topo:
        _say("== portproxy demo: a client, a host and a container, in namespaces of their own ==")
        _say(f"client    {topo.client.name:<22} {topo.client_ip}")
        _say(f"host      {topo.host.name:<22} {topo.bridge} {topo.bridge_ip}/16, outside {topo.host_ip}")
        _say(f"container {topo.container.name:<22} {topo.container_ip} serving HTTP on 8080")
        server = start_http_server(topo.container, 8080)
        try:
            _userland(topo, loop)
            _kernel(topo)
            _switching(topo, loop)
            _client_address(topo, loop)
        finally:
            server.shutdown()
            server.server_close()
    _say("\nnamespaces removed; the root namespace was not changed.")
    return 0
