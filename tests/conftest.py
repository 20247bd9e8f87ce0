"""Shared fixtures: a fresh demo topology per test, portproxy processes inside it, servers.

Every namespace gets a unique name and is removed when the test ends, pass or
fail. The proxy under test runs as a real ``portproxy`` process in the host
namespace; servers and clients run on the test's own event loop with sockets
created inside the container and client namespaces. The helpers themselves are
modules of tests/support (``from tests.support.traffic import open_connection``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

import pytest

from portproxy.lab.namespaces import Namespace
from portproxy.lab.topology import DemoTopology, demo_topology
from tests.support.processes import PortproxyProcess
from tests.support.traffic import echo_handler, start_server, start_udp_echo


@pytest.fixture
def topo() -> Iterator[DemoTopology]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    with demo_topology("pt") as t:
        yield t


@pytest.fixture
def portproxy(topo: DemoTopology) -> Iterator[Callable[..., PortproxyProcess]]:
    """Start ``portproxy ARGS`` in the host namespace; stopped at teardown."""
    started: list[PortproxyProcess] = []

    def start(*args: str, ns: Namespace | None = None, ready: int | None = 1,
              prefix: list[str] | None = None) -> PortproxyProcess:
        proc = PortproxyProcess(ns or topo.host, list(args), ready, prefix)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


# --- servers inside the container ---------------------------------------------

@pytest.fixture
async def tcp_echo(topo: DemoTopology) -> AsyncIterator[asyncio.Server]:
    """A TCP echo server in the container on 8080 (IPv4) and [fd00:172:16::1]:8080."""
    v4 = await start_server(topo.container, 8080, echo_handler)
    v6 = await start_server(topo.container, 8080, echo_handler, host="::")
    yield v4
    for server in (v4, v6):
        server.close()


@pytest.fixture
async def udp_echo(topo: DemoTopology) -> AsyncIterator[None]:
    """UDP echo servers in the container on 5353 (IPv4 and IPv6)."""
    transports = [await start_udp_echo(topo.container, 5353), await start_udp_echo(topo.container, 5353, "::")]
    yield None
    for t in transports:
        t.close()


@pytest.fixture
def daemon(topo, tmp_path):
    """``portproxy serve`` in the host namespace: returns (start(config_text), cli(*args))."""
    started: list[PortproxyProcess] = []
    # Outside pytest's 0700 tmp tree, so an unprivileged peer can reach the socket file.
    sock_dir = Path(tempfile.mkdtemp(prefix="portproxy-test-"))
    sock_dir.chmod(0o755)
    sock = sock_dir / "pp.sock"
    config = tmp_path / "portproxy.toml"

    def start(config_text: str = "", *extra: str) -> PortproxyProcess:
        config.write_text(config_text)
        proc = PortproxyProcess(topo.host, ["serve", "--config", str(config), "--state-dir", str(tmp_path / "state"),
                                            "--socket", str(sock), *extra], ready_lines=1)
        started.append(proc)
        return proc

    def cli(*args: str, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([*(prefix or []), sys.executable, "-m", "portproxy", *args, "--socket", str(sock)],
                              capture_output=True, text=True, timeout=60)

    start.config = config  # type: ignore[attr-defined]
    start.socket = sock  # type: ignore[attr-defined]
    start.state = tmp_path / "state" / "state.json"  # type: ignore[attr-defined]
    yield start, cli
    for proc in started:
        proc.stop()
    shutil.rmtree(sock_dir, ignore_errors=True)
