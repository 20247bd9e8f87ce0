"""The command line's error contract: one readable line, the right exit status, nothing half-started."""

from __future__ import annotations

import subprocess

import pytest

from tests.support.processes import run_portproxy
from tests.support.traffic import open_connection


async def test_port_in_use_fails_whole_command_cleanly(topo, portproxy) -> None:
    """A port in use: one line naming it, exit 1, and the command's other mappings never listen."""
    holder = topo.host.socket()
    holder.bind(("0.0.0.0", 9191))
    holder.listen()
    proc = portproxy("map", f"9190:{topo.container_ip}:8080", f"9191:{topo.container_ip}:8080", ready=None)
    code = proc.proc.wait(timeout=20)
    proc.stop()
    assert code == 1
    lines = proc.stderr.strip().splitlines()
    assert lines == ["portproxy: cannot listen on 0.0.0.0:9191/tcp: port is already in use"]
    with pytest.raises(ConnectionRefusedError):
        await open_connection(topo.client, topo.host_ip, 9190)
    holder.close()


async def test_port_in_use_leaves_running_proxy_untouched(topo, tcp_echo, portproxy) -> None:
    first = portproxy("map", f"9090:{topo.container_ip}:8080")
    second = portproxy("map", f"9090:{topo.container_ip}:8080", ready=None)
    assert second.proc.wait(timeout=20) == 1
    assert "9090/tcp: port is already in use" in second.stderr
    reader, writer = await open_connection(topo.client, topo.host_ip, 9090)
    writer.write(b"ok")
    assert await reader.readexactly(2) == b"ok"
    writer.close()
    assert first.proc.poll() is None


def test_demo_runs_and_cleans_up() -> None:
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root")
    before = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    result = run_portproxy("demo", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ready tcp 0.0.0.0:9090 -> 172.16.1.1:8080" in result.stdout
    assert "client GET http://198.51.100.1:9090/ -> HTTP/1.0 200 OK" in result.stdout
    assert "ready tcp 0.0.0.0:9090 -> 172.16.1.1:8080 (kernel)" in result.stdout
    assert 'portproxy_bytes_total{direction="to_client",listen="*:9090",path="kernel"' in result.stdout
    assert "container GET http://198.51.100.1:9090/ -> HTTP/1.0 200 OK" in result.stdout
    assert "kernel counters of 9090:172.16.1.1:8080: 3 connections" in result.stdout
    assert "ran through 5 switches: 26214400 bytes" in result.stdout and "every byte intact" in result.stdout
    for mode in ("userland", "kernel", "hybrid"):  # the closing scene: the client's address on every path
        assert f"  {mode:<8} the container sees: 198.51.100.2\n" in result.stdout, result.stdout
    after = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    assert {name for name in after - before if name.startswith("ppdemo-")} == set()  # (others' may come and go)
