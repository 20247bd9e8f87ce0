"""PROXY protocol v1 and v2 judged by real parsers: Debian's nginx and HAProxy in the container.

portproxy runs in the host namespace with ``--proxy-protocol``; the client connects
from the client namespace; the server, started by the test inside the container
namespace with every path under a temp dir, reports the address the header carried:
nginx in its access log (``$proxy_protocol_addr $proxy_protocol_port``), HAProxy in
the response body (``%[src] %[src_port]`` with ``accept-proxy``).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.traffic import open_connection
from portproxy import debcache
from portproxy.bench.servers import nginx_conf


NGINX_HTTP = """\
    log_format pp '$proxy_protocol_addr $proxy_protocol_port $remote_addr';
    access_log {dir}/access.log pp;
    server {{
        listen 8080 proxy_protocol;
        listen [::]:8080 proxy_protocol ipv6only=on;
        location / {{ return 200 "ok\\n"; }}
    }}"""

HAPROXY_CONF = """\
global
    nbthread 1
defaults
    mode http
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend pp
    bind 0.0.0.0:8080 accept-proxy
    bind [::]:8080 v6only accept-proxy
    http-request return status 200 content-type text/plain lf-string "%[src] %[src_port]"
"""


def wait_port(ns, port: int, proc: subprocess.Popen, what: str) -> None:
    import socket

    def up() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    deadline = time.monotonic() + 20
    while not ns.run(up):
        assert proc.poll() is None, f"{what} exited {proc.returncode}"
        assert time.monotonic() < deadline, f"{what} does not listen on {port}"
        time.sleep(0.05)


@pytest.fixture
def nginx(topo, tmp_path):
    binary = debcache.command("nginx")
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_conf(str(tmp_path), NGINX_HTTP.format(dir=tmp_path)))
    proc = topo.container.popen([*binary, "-c", str(conf), "-p", str(tmp_path), "-e", str(tmp_path / "error.log"),
                                 "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(topo.container, 8080, proc, "nginx")
        yield tmp_path / "access.log"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture
def haproxy(topo, tmp_path):
    binary = debcache.command("haproxy")
    conf = tmp_path / "haproxy.cfg"
    conf.write_text(HAPROXY_CONF)
    proc = topo.container.popen([*binary, "-db", "-f", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(topo.container, 8080, proc, "haproxy")
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=20)


async def wait_ready(proxy, count: int) -> None:
    """Wait for ``count`` ready lines (a spec without host address publishes on both families)."""
    while len(proxy.ready) < count:
        line = await asyncio.to_thread(proxy.proc.stdout.readline)
        assert line, proxy.stderr
        if line.startswith("ready"):
            proxy.ready.append(line.strip())


async def http_get(ns, host: str, port: int) -> tuple[bytes, tuple]:
    """One HTTP/1.0 GET from ``ns``; (the body, our local address)."""
    reader, writer = await open_connection(ns, host, port)
    local = writer.get_extra_info("sockname")
    writer.write(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    try:
        reply = await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0], reply
    return body, local


async def access_lines(log: Path, count: int) -> list[str]:
    deadline = time.monotonic() + 10
    while True:
        lines = log.read_text().splitlines() if log.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_nginx_logs_the_client(topo, nginx, portproxy, version) -> None:
    proxy = portproxy("map", f"0.0.0.0:9090:{topo.container_ip}:8080", f"9096:[{topo.container_ip6}]:8080",
                      "--proxy-protocol", version, ready=None)
    await wait_ready(proxy, 3)
    _, local4 = await http_get(topo.client, topo.host_ip, 9090)
    _, local6 = await http_get(topo.client, topo.host_ip6, 9096)
    # An IPv4 client of the IPv6 target (published on both families) is sent as TCP4.
    _, local_mapped = await http_get(topo.client, topo.host_ip, 9096)
    lines = await access_lines(nginx, 3)
    # $remote_addr stays the proxy's (bridge) address: the client's came in the header alone.
    assert lines == [f"{topo.client_ip} {local4[1]} {topo.bridge_ip}",
                     f"{topo.client_ip6} {local6[1]} {topo.bridge_ip6}",
                     f"{topo.client_ip} {local_mapped[1]} {topo.bridge_ip6}"]


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_haproxy_sees_the_client(topo, haproxy, portproxy, version) -> None:
    portproxy("map", f"9090:{topo.container_ip}:8080", f"[::]:9096:[{topo.container_ip6}]:8080",
              "--proxy-protocol", version, ready=2)
    body, local = await http_get(topo.client, topo.host_ip, 9090)
    assert body.decode() == f"{topo.client_ip} {local[1]}"
    body, local = await http_get(topo.client, topo.host_ip6, 9096)
    assert body.decode() == f"{topo.client_ip6} {local[1]}"


async def test_server_speaks_first_gets_header_without_client_data(topo, portproxy) -> None:
    """A server-first protocol (SMTP, MySQL): the header is sent at once, not held back
    waiting for client bytes to ride with it."""
    from tests.support.traffic import start_server

    async def greeter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readuntil(b"\r\n")
        writer.write(b"220 hello " + line)
        await writer.drain()
        writer.close()

    server = await start_server(topo.container, 2525, greeter)
    try:
        portproxy("map", f"2525:{topo.container_ip}:2525", "--proxy-protocol", "v1")
        reader, writer = await open_connection(topo.client, topo.host_ip, 2525)
        local = writer.get_extra_info("sockname")
        greeting = await asyncio.wait_for(reader.read(-1), 10)
        writer.close()
        assert greeting == f"220 hello PROXY TCP4 {topo.client_ip} {topo.host_ip} {local[1]} 2525\r\n".encode()
    finally:
        server.close()
