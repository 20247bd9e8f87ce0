"""systemd integration: unit files, sd_notify on a real notify socket, socket activation, journal logs.

No systemd PID 1 here: the units are checked with systemd-analyze, and the daemon is
run with the environment systemd would give it (NOTIFY_SOCKET, LISTEN_FDS, JOURNAL_STREAM).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.processes import PortproxyProcess
from tests.support.traffic import open_connection

ROOT = Path(__file__).resolve().parents[2]
needs_systemd_tools = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")


def _units_with_real_binary(tmp_path: Path) -> list[Path]:
    """The shipped units with ExecStart pointing at this checkout's portproxy."""
    binary = Path(sys.executable).parent / "portproxy"
    out = []
    for name in ("portproxy.service", "portproxy.socket"):
        text = (ROOT / "systemd" / name).read_text().replace("/usr/local/bin/portproxy", str(binary))
        path = tmp_path / name
        path.write_text(text)
        out.append(path)
    return out


@needs_systemd_tools
def test_units_verify(tmp_path: Path) -> None:
    units = _units_with_real_binary(tmp_path)
    result = subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


@needs_systemd_tools
def test_security_exposure_at_most_3(tmp_path: Path) -> None:
    service = _units_with_real_binary(tmp_path)[0]
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(service)],
                            capture_output=True, text=True)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 3.0


class NotifySocket:
    """A real AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []

    def collect(self, until: str, timeout: float = 20) -> list[dict[str, str]]:
        """Receive until a message has field ``until`` (e.g. "READY"); return all so far."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096).decode()
            except socket.timeout:
                continue
            fields = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
            self.messages.append(fields)
            if until in fields:
                return self.messages
        raise AssertionError(f"no {until} among {self.messages}")


async def test_sd_notify_ready_only_when_accepting_then_reload_and_stop(topo, tcp_echo, tmp_path) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    config = tmp_path / "portproxy.toml"
    config.write_text(f'[[mapping]]\nspec = "9090:{topo.container_ip}:8080"\n')
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}
    proc = topo.host.popen([sys.executable, "-m", "portproxy", "serve", "--config", str(config), "--state-dir",
                            str(tmp_path / "state"), "--socket", str(tmp_path / "pp.sock"), "--metrics-addr", "off"],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        messages = await asyncio.to_thread(notify.collect, "READY")
        # At the moment READY=1 arrives, the mapping accepts traffic.
        reader, writer = await open_connection(topo.client, topo.host_ip, 9090)
        writer.write(b"ready?")
        assert await reader.readexactly(6) == b"ready?"
        writer.close()
        ready = messages[-1]
        assert ready["READY"] == "1" and ready["STATUS"].startswith("1 mapping(s): 1 userland")
        # Watchdog pings every WatchdogSec/2.
        await asyncio.to_thread(notify.collect, "WATCHDOG")
        # Reload: RELOADING=1 with MONOTONIC_USEC, then READY=1 again, in that order.
        notify.messages.clear()
        proc.send_signal(signal.SIGHUP)
        await asyncio.to_thread(notify.collect, "READY")
        kinds = [next(k for k in ("RELOADING", "READY") if k in m) for m in notify.messages
                 if "RELOADING" in m or "READY" in m]
        assert kinds == ["RELOADING", "READY"]
        reloading = next(m for m in notify.messages if "RELOADING" in m)
        assert int(reloading["MONOTONIC_USEC"]) > 0
        # Stop: STOPPING=1.
        notify.messages.clear()
        proc.terminate()
        await asyncio.to_thread(notify.collect, "STOPPING")
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate missing")
async def test_socket_activation_adopts_passed_listener(topo, tcp_echo, tmp_path) -> None:
    config = tmp_path / "portproxy.toml"
    config.write_text(f'[[mapping]]\nspec = "9090:{topo.container_ip}:8080"\n')
    # systemd-socket-activate listens itself and starts the daemon on the first connection,
    # passing the listening socket: that first client waits in its queue meanwhile.
    proc = PortproxyProcess(topo.host, ["serve", "--config", str(config), "--state-dir", str(tmp_path / "state"),
                                        "--socket", str(tmp_path / "pp.sock"), "--metrics-addr", "off"],
                            ready_lines=None, prefix=["systemd-socket-activate", "-l", "0.0.0.0:9090", "--"])
    try:
        await asyncio.sleep(0.5)
        reader, writer = await open_connection(topo.client, topo.host_ip, 9090)
        writer.write(b"activated")
        assert await asyncio.wait_for(reader.readexactly(9), 30) == b"activated"
        writer.close()
        reader, writer = await open_connection(topo.client, topo.host_ip, 9090)
        writer.write(b"again")
        assert await asyncio.wait_for(reader.readexactly(5), 10) == b"again"
        writer.close()
    finally:
        code = proc.stop()
    assert "adopted a passed tcp socket on 0.0.0.0 port 9090" in proc.stderr
    assert code == 0


