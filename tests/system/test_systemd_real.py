"""The shipped unit under a real systemd: Debian 12's systemd 252 booted as PID 1 of a container
(tests/support/systemd_boot.py) in the test's host namespace, the demo topology around it.

The root is a bookworm minbase with systemd, python3 and the python3-* libraries the package
depends on (debian/control), from Debian (tests/support/debian_root.py). This checkout is
bind-mounted read-only at /opt/portproxy and run by the root's own python3 through
/usr/local/bin/portproxy, the path the unit in systemd/ names: so these tests run the unit
file exactly as shipped and the code as it is in the tree, with no package build (that is
tests/system/test_packaging.py's, which also runs the built .deb under this systemd).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.support.traffic import echo_roundtrip, open_connection, udp_endpoint
from tests.support import debian_root as roots
from tests.support.systemd_boot import BootedSystemd, cgroup_layout

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "portproxy.service"
CONFIG = "/etc/portproxy/portproxy.toml"
WRAPPER = """#!/bin/sh
# This checkout (bind-mounted read-only), on the root's own python3 and python3-* libraries.
export PYTHONPATH=/opt/portproxy PYTHONDONTWRITEBYTECODE=1
exec /usr/bin/python3 -m portproxy "$@"
"""

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("debootstrap", "unshare", "nsenter"))
    or cgroup_layout() is None,
    reason="needs root, debootstrap, unshare, nsenter and a hybrid or unified cgroup layout")


@pytest.fixture(scope="module")
def systemd_root(tmp_path_factory: pytest.TempPathFactory):
    """The root every container of this module boots (each over an overlay of its own)."""
    depends = roots.package_depends((ROOT / "debian/control").read_text())
    tar = roots.tarball("bookworm", ["systemd", "python3", *depends])
    path = roots.unpack(tar, tmp_path_factory.mktemp("systemd-root"))
    try:
        wrapper = path / "usr/local/bin/portproxy"
        wrapper.write_text(WRAPPER)
        wrapper.chmod(0o755)
        for unit in ("portproxy.service", "portproxy.socket"):
            shutil.copy(ROOT / "systemd" / unit, path / "etc/systemd/system" / unit)
        # No console in a container: its getty would only fail.
        (path / "etc/systemd/system/console-getty.service").symlink_to("/dev/null")
        (path / "etc/portproxy").mkdir()
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def booted(topo, systemd_root: Path, tmp_path: Path):
    """systemd booted in the topology's host namespace; ended, and its cgroup removed, after."""
    container = BootedSystemd(systemd_root, topo.host.name, tmp_path / "container", {ROOT: "/opt/portproxy"})
    host_nodes = {node: os.stat(node).st_ctime_ns for node in ("/dev/null", "/dev/tty", "/dev/urandom")}
    try:
        container.boot()
        yield container
    finally:
        container.kill()
        assert not any((h / container.cgroup).exists() for h in container.hierarchies)
        # The host's device nodes were not chmod-ed or chown-ed from inside.
        assert {node: os.stat(node).st_ctime_ns for node in host_nodes} == host_nodes


def mapping_config(*specs: str) -> str:
    return "".join(f'[[mapping]]\nspec = "{spec}"\n' for spec in specs)


def start(booted: BootedSystemd, config: str) -> int:
    booted.write(CONFIG, config)
    result = booted.systemctl("start", SERVICE)
    assert result.returncode == 0, result.stderr + "\n".join(booted.journal(SERVICE))
    return booted.main_pid(SERVICE)


def wait_for(predicate, timeout: float, what: str) -> None:
    """Until ``predicate()`` holds (a state systemd reaches on its own), or fail saying ``what``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)


async def test_start_returns_when_ready_and_serving(booted, topo, tcp_echo) -> None:
    """Type=notify: `systemctl start` returns once READY=1 came, and by then the port serves."""
    main = start(booted, mapping_config(f"9090:{topo.container_ip}:8080"))
    # No wait at all: the first connection made after start returned is served.
    assert await echo_roundtrip(topo.client, topo.host_ip, 9090, b"ready?") == b"ready?"
    assert booted.systemctl("is-active", SERVICE).stdout.strip() == "active"
    assert booted.show(SERVICE, "StatusText").startswith("1 mapping(s): 1 userland")
    assert booted.show(SERVICE, "Type") == "notify" and main > 1
    assert any(line.startswith("ready 1 mapping(s)") for line in booted.journal(SERVICE))


async def test_reload_applies_the_config_in_place_and_refuses_a_bad_one(booted, topo, tcp_echo) -> None:
    main = start(booted, mapping_config(f"9090:{topo.container_ip}:8080"))
    reader, writer = await open_connection(topo.client, topo.host_ip, 9090)  # lives across the reload
    try:
        booted.write(CONFIG, mapping_config(f"9090:{topo.container_ip}:8080", f"9091:{topo.container_ip}:8080"))
        result = booted.systemctl("reload", SERVICE)
        assert result.returncode == 0, result.stderr
        # Applied when reload returned, by the same process, the open connection untouched.
        assert await echo_roundtrip(topo.client, topo.host_ip, 9091, b"new port") == b"new port"
        assert booted.main_pid(SERVICE) == main
        writer.write(b"still here")
        assert await asyncio.wait_for(reader.readexactly(10), 10) == b"still here"

        # A config the daemon refuses: reload fails, the service serves on as before.
        booted.write(CONFIG, "[[mapping]]\nspec = 'not a mapping'\n")
        refused = booted.systemctl("reload", SERVICE)
        assert refused.returncode != 0
        assert booted.systemctl("is-active", SERVICE).stdout.strip() == "active"
        assert booted.main_pid(SERVICE) == main
        assert await echo_roundtrip(topo.client, topo.host_ip, 9091, b"as before") == b"as before"
    finally:
        writer.close()
    # The journal has the daemon's lines with their priorities (stderr is the journal stream).
    entries = [json.loads(line) for line in
               booted.check(["journalctl", "--no-pager", "-o", "json", "-u", SERVICE]).splitlines()]
    refusals = [e for e in entries if "reload refused" in e.get("MESSAGE", "")]
    assert refusals and all(e["PRIORITY"] == "3" and e["_PID"] == str(main) for e in refusals), refusals


async def test_watchdog_kills_a_hung_daemon_and_it_is_restarted(booted, topo, tcp_echo) -> None:
    """SIGSTOP stops the event loop and its pings with it: after WatchdogSec (shortened by a
    drop-in) systemd kills the daemon, and Restart=on-failure brings a new one up."""
    booted.write("/etc/systemd/system/portproxy.service.d/watchdog.conf", "[Service]\nWatchdogSec=2s\n")
    booted.check(["systemctl", "daemon-reload"])
    first = start(booted, mapping_config(f"9090:{topo.container_ip}:8080"))
    # The control: a running loop pings, so two watchdog periods pass without a kill.
    await asyncio.sleep(4)
    assert booted.main_pid(SERVICE) == first and booted.show(SERVICE, "NRestarts") == "0"

    booted.signal(first, "STOP")
    wait_for(lambda: booted.show(SERVICE, "NRestarts") == "1" and booted.show(SERVICE, "SubState") == "running",
             30, "the watchdog's kill and the restart")
    second = booted.main_pid(SERVICE)
    assert second not in (0, first)
    journal = "\n".join(booted.journal(SERVICE))
    assert "Watchdog timeout (limit 2s)!" in journal
    assert "Failed with result 'watchdog'" in journal
    assert await echo_roundtrip(topo.client, topo.host_ip, 9090, b"back") == b"back"


async def test_socket_activation_starts_the_service_on_the_first_connection(booted, topo, tcp_echo, udp_echo) -> None:
    """The shipped .socket holds 9090/tcp and 5353/udp; the first connection starts the service,
    which adopts both passed sockets for its mappings; that first client is served."""
    booted.write(CONFIG, mapping_config(f"9090:{topo.container_ip}:8080", f"5353:{topo.container_ip}:5353/udp"))
    result = booted.systemctl("start", "portproxy.socket")
    assert result.returncode == 0, result.stderr
    assert booted.systemctl("is-active", SERVICE).stdout.strip() == "inactive"
    assert await echo_roundtrip(topo.client, topo.host_ip, 9090, b"activated") == b"activated"
    assert booted.systemctl("is-active", SERVICE).stdout.strip() == "active"
    journal = "\n".join(booted.journal(SERVICE))
    assert "adopted a passed tcp socket on 0.0.0.0 port 9090" in journal
    assert "adopted a passed udp socket on 0.0.0.0 port 5353" in journal
    client = await udp_endpoint(topo.client)
    client.transport.sendto(b"dns?", (topo.host_ip, 5353))
    assert (await client.recv())[0] == b"dns?"
    client.transport.close()


def proc_status(booted: BootedSystemd, pid: int) -> dict[str, str]:
    text = booted.check(["cat", f"/proc/{pid}/status"])
    return {k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines())}


def try_write(booted: BootedSystemd, pid: int, path: str) -> str:
    """Create ``path`` from inside the service's mount namespace: "" or the error."""
    result = booted.run(["nsenter", "-t", str(pid), "-m", "sh", "-c", f": > {path} && rm {path}"])
    return result.stderr.strip() if result.returncode else ""


def test_hardening_directives_are_in_force(booted) -> None:
    main = start(booted, "")
    status = proc_status(booted, main)
    net_admin_and_bind = f"{(1 << 12) | (1 << 10):016x}"  # CAP_NET_ADMIN, CAP_NET_BIND_SERVICE
    assert status["CapEff"] == status["CapPrm"] == status["CapBnd"] == status["CapAmb"] == net_admin_and_bind
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"  # SystemCallFilter=, RestrictAddressFamilies=: a filter is loaded
    assert status["Uid"].split()[0] == "0"
    # ProtectSystem=strict: everything read-only but the service's own state and runtime dirs.
    for path in ("/usr/x", "/etc/x", "/etc/portproxy/x", "/var/x", "/opt/x"):
        assert "Read-only file system" in try_write(booted, main, path), path
    for path in ("/var/lib/portproxy/x", "/run/portproxy/x", "/tmp/x"):
        assert try_write(booted, main, path) == "", path
    # ProtectHome=, PrivateTmp=, PrivateDevices=: other views than the container's own.
    assert try_write(booted, main, "/root/x") != ""
    booted.check(["touch", "/tmp/outside"])
    assert booted.run(["nsenter", "-t", str(main), "-m", "test", "-e", "/tmp/outside"]).returncode != 0
    devices = booted.check(["nsenter", "-t", str(main), "-m", "ls", "/dev"]).split()
    assert "console" in booted.check(["ls", "/dev"]).split()
    assert "null" in devices and "console" not in devices  # API pseudo devices only
    # UMask=0077: what the daemon creates is its own.
    mode = booted.check(["stat", "-c", "%a", "/var/lib/portproxy/lock"]).strip()
    assert mode == "600", mode


async def test_stop_drains_and_leaves_nothing_running(booted, topo, tcp_echo) -> None:
    main = start(booted, mapping_config(f"9090:{topo.container_ip}:8080"))
    assert await echo_roundtrip(topo.client, topo.host_ip, 9090, b"x") == b"x"
    result = booted.systemctl("stop", SERVICE)
    assert result.returncode == 0, result.stderr
    assert booted.systemctl("is-active", SERVICE).stdout.strip() == "inactive"
    assert booted.show(SERVICE, "Result") == "success"
    assert booted.show(SERVICE, "ExecMainStatus") == "0"
    assert booted.run(["test", "-e", f"/proc/{main}"]).returncode != 0
    assert booted.run(["test", "-e", "/run/portproxy/portproxy.sock"]).returncode != 0
    journal = booted.journal(SERVICE)
    assert any("SIGTERM: stopping; draining 0 connection(s)" in line for line in journal)
    assert journal[-1].startswith("Stopped portproxy.service")


def test_kill_9_is_restarted(booted) -> None:
    """What the fd store will build on: a crash is followed by a new process (Restart=on-failure)."""
    first = start(booted, "")
    booted.signal(first, "KILL")
    wait_for(lambda: booted.show(SERVICE, "NRestarts") == "1" and booted.show(SERVICE, "SubState") == "running",
             30, "the restart after kill -9")
    assert booted.main_pid(SERVICE) != first
    assert "portproxy.service: Main process exited, code=killed, status=9/KILL" in "\n".join(booted.journal(SERVICE))
