"""The servers in the container namespace, one per workload, started once for the whole run.

``SERVICES`` names each service's container port; a path publishes each of them on
its own host port (see ``paths``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from .. import debcache

if TYPE_CHECKING:
    from ..lab.topology import DemoTopology


@dataclasses.dataclass(frozen=True)
class Service:
    name: str
    port: int
    protocols: tuple[str, ...]


# iperf3 runs its control connection over TCP and its UDP test on the same port number.
IPERF = Service("iperf3", 5201, ("tcp", "udp"))
SOCKPERF_TCP = Service("sockperf-tcp", 11111, ("tcp",))
SOCKPERF_UDP = Service("sockperf-udp", 11112, ("udp",))
HTTP = Service("nginx", 8080, ("tcp",))
HTTP_PROXY_PROTOCOL_PORT = 8081
"""The same nginx server behind ``listen ... proxy_protocol``, for the PROXY-protocol path."""
SINK = Service("idle-sink", 7000, ("tcp",))
FIREHOSE = Service("firehose", 7001, ("tcp",))
SERVICES = (IPERF, SOCKPERF_TCP, SOCKPERF_UDP, HTTP)

NGINX_FRAME = """\
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
{http}
}}
"""

NGINX_HTTP = """\
    access_log off;
    server {{
        listen {port} backlog=8192;
        listen {pp_port} proxy_protocol backlog=8192;
        location / {{ return 200 "ok\\n"; }}
    }}"""


def nginx_conf(directory: str, http: str) -> str:
    """An nginx config whose every path (pid, logs, temp files) is under ``directory``."""
    return NGINX_FRAME.format(dir=directory, http=http)


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def container_servers(topo: DemoTopology) -> Iterator[None]:
    """iperf3 (TCP+UDP), sockperf (TCP, UDP) and nginx (one worker) in the container."""
    ns = topo.container
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    with tempfile.TemporaryDirectory(prefix="portproxy-bench-nginx-") as tmp:
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(nginx_conf(tmp, NGINX_HTTP.format(port=HTTP.port, pp_port=HTTP_PROXY_PROTOCOL_PORT)))
        try:
            iperf3, sockperf, nginx = (debcache.command(name) for name in ("iperf3", "sockperf", "nginx"))
        except debcache.ToolUnavailable as exc:
            raise RuntimeError(f"benchmark server unavailable: {exc}") from None
        procs = [
            ns.popen([*iperf3, "-s", "-p", str(IPERF.port)], **quiet),
            ns.popen([*sockperf, "server", "-i", "0.0.0.0", "-p", str(SOCKPERF_TCP.port), "--tcp"], **quiet),
            ns.popen([*sockperf, "server", "-i", "0.0.0.0", "-p", str(SOCKPERF_UDP.port)], **quiet),
            ns.popen([*nginx, "-c", str(conf), "-p", tmp, "-g", "daemon off;"], **quiet),
        ]
        try:
            time.sleep(0.5)
            dead = [debcache.program_of(p.args) for p in procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"benchmark server(s) did not start: {', '.join(dead)}")
            yield
        finally:
            _stop(procs)
