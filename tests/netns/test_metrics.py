"""Prometheus metrics: exact userland counters, kernel counters, promtool, and a real Prometheus scraping."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import urllib.parse

import pytest

from tests.support import programs

from tests.support.traffic import connect_expecting_close, echo_roundtrip, udp_endpoint
from tests.support.metrics import METRICS_PORT, http_get, sample, scrape


@pytest.fixture(scope="module")
def prometheus() -> dict[str, list[str]]:
    """Debian's prometheus and promtool, unpacked into the tool cache (setup.sh fetches them)."""
    try:
        return {name: programs.command(name) for name in ("prometheus", "promtool")}
    except programs.ToolUnavailable as exc:
        pytest.skip(str(exc))


async def _echo(topo, port: int, payload: bytes) -> None:
    assert await echo_roundtrip(topo.client, topo.host_ip, port, payload, timeout=30) == payload


async def test_userland_counters_are_exact(topo, tcp_echo, udp_echo, portproxy) -> None:
    portproxy("map", f"9090:{topo.container_ip}:8080", f"5353:{topo.container_ip}:5353/udp", "--metrics-addr",
              ready=2)
    labels = {"proto": "tcp", "listen": "*:9090", "target": f"{topo.container_ip}:8080"}
    text = scrape(topo.host)
    assert sample(text, "portproxy_bytes_total", direction="to_target", path="userland", **labels) == 0
    sizes = [1, 1000, 123_457, 3_000_001]
    for size in sizes:
        await _echo(topo, 9090, os.urandom(size))
    await asyncio.sleep(0.2)
    text = scrape(topo.host)
    assert sample(text, "portproxy_bytes_total", direction="to_target", path="userland", **labels) == sum(sizes)
    assert sample(text, "portproxy_bytes_total", direction="to_client", path="userland", **labels) == sum(sizes)
    assert sample(text, "portproxy_connections_total", path="userland", **labels) == len(sizes)
    assert sample(text, "portproxy_connections_active", **labels) == 0
    assert sample(text, "portproxy_connect_duration_seconds_count", **labels) == len(sizes)
    assert sample(text, "portproxy_mapping_mode", mode="userland", **labels) == 1
    # UDP: datagrams and bytes by direction, flows created.
    client = await udp_endpoint(topo.client)
    for size in (10, 20, 30):
        client.transport.sendto(b"u" * size, (topo.host_ip, 5353))
        await client.recv()
    text = scrape(topo.host)
    udp = {"proto": "udp", "listen": "*:5353", "target": f"{topo.container_ip}:5353"}
    assert sample(text, "portproxy_udp_datagrams_total", direction="to_target", **udp) == 3
    assert sample(text, "portproxy_udp_datagrams_total", direction="to_client", **udp) == 3
    assert sample(text, "portproxy_bytes_total", direction="to_target", path="userland", **udp) == 60
    assert sample(text, "portproxy_udp_flows_total", event="created", **udp) == 1
    assert sample(text, "portproxy_udp_flows_active", **udp) == 1
    # No client address anywhere in the exposition.
    assert topo.client_ip not in text


async def test_connect_failures_by_reason(topo, portproxy) -> None:
    portproxy("map", f"9092:{topo.container_ip}:8099", "--metrics-addr")
    for _ in range(2):
        await connect_expecting_close(topo.client, topo.host_ip, 9092, 5)
    await asyncio.sleep(0.2)
    text = scrape(topo.host)
    assert sample(text, "portproxy_connect_failures_total", reason="ECONNREFUSED", listen="*:9092") == 2


async def test_kernel_counters(topo, tcp_echo, portproxy) -> None:
    portproxy("map", "--mode", "kernel", f"9090:{topo.container_ip}:8080", "--metrics-addr")
    labels = {"proto": "tcp", "listen": "*:9090", "target": f"{topo.container_ip}:8080"}
    payload = os.urandom(2_000_000)
    await _echo(topo, 9090, payload)
    text = scrape(topo.host)
    assert sample(text, "portproxy_connections_total", path="kernel", **labels) == 1
    assert sample(text, "portproxy_bytes_total", path="kernel", direction="to_target", **labels) >= len(payload)
    assert sample(text, "portproxy_bytes_total", path="kernel", direction="to_client", **labels) >= len(payload)
    assert sample(text, "portproxy_kernel_packets_total", direction="to_target", **labels) > 0
    assert sample(text, "portproxy_mapping_mode", mode="kernel", **labels) == 1


async def test_exposition_passes_promtool(topo, tcp_echo, portproxy, prometheus) -> None:
    for args, ready in ((["map", f"9090:{topo.container_ip}:8080", f"9091:{topo.container_ip}:8080/udp"], 2),
                        (["map", "--mode", "kernel", f"9090:{topo.container_ip}:8080"], 1)):
        proc = portproxy(*args, "--metrics-addr", ready=ready)
        await _echo(topo, 9090, b"some bytes")
        text = scrape(topo.host)
        check = subprocess.run([*prometheus["promtool"], "check", "metrics"], input=text, capture_output=True,
                               text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        proc.stop()


@pytest.mark.parametrize("mode", ["userland", "kernel"])
async def test_real_prometheus_scrapes_the_byte_counter(topo, tcp_echo, daemon, tmp_path, mode, prometheus) -> None:
    start, cli = daemon
    start(f'[[mapping]]\nspec = "9090:{topo.container_ip}:8080"\nmode = "{mode}"\n')
    await _echo(topo, 9090, os.urandom(500_000))
    config = tmp_path / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: portproxy\n"
                      f"    static_configs:\n      - targets: ['127.0.0.1:{METRICS_PORT}']\n")
    prom = topo.host.popen([*prometheus["prometheus"], f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                            "--web.listen-address=127.0.0.1:19090", "--log.level=warn"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        query = urllib.parse.quote(f'portproxy_bytes_total{{path="{mode}",direction="to_target"}}')
        value = None
        for _ in range(60):
            try:
                body = json.loads(http_get(topo.host, 19090, f"/api/v1/query?query={query}"))
                results = body["data"]["result"]
                if results and float(results[0]["value"][1]) > 0:
                    value = float(results[0]["value"][1])
                    break
            except (OSError, ValueError, KeyError):
                pass
            await asyncio.sleep(0.5)
        assert value is not None and value >= 500_000
    finally:
        prom.terminate()
        prom.wait(timeout=20)


async def test_series_disappear_when_mapping_removed(topo, tcp_echo, daemon) -> None:
    start, cli = daemon
    start(f'[[mapping]]\nspec = "9090:{topo.container_ip}:8080"\n')
    assert cli("add", f"9091:{topo.container_ip}:8080", "--mode", "kernel").returncode == 0
    await _echo(topo, 9091, b"x" * 1000)
    text = scrape(topo.host)
    assert sample(text, "portproxy_bytes_total", listen="*:9091", path="kernel", direction="to_target") > 0
    assert cli("rm", "9091").returncode == 0
    text = scrape(topo.host)
    assert 'listen="*:9091"' not in text
    assert 'listen="*:9090"' in text


async def test_switching_keeps_userland_counters_monotonic(topo, tcp_echo, daemon) -> None:
    start, cli = daemon
    start(f'[[mapping]]\nspec = "9090:{topo.container_ip}:8080"\n')
    await _echo(topo, 9090, b"y" * 5000)
    assert cli("switch", "9090", "--mode", "kernel").returncode == 0
    assert cli("switch", "9090", "--mode", "userland").returncode == 0
    await _echo(topo, 9090, b"z" * 7000)
    text = scrape(topo.host)
    assert sample(text, "portproxy_bytes_total", listen="*:9090", path="userland", direction="to_target") == 12000
    # Kernel series exist while the mapping has a DNAT (they restart from 0 if it comes back).
    assert sample(text, "portproxy_bytes_total", listen="*:9090", path="kernel", direction="to_target") is None
