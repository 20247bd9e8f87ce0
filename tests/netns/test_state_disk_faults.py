"""A full or read-only state directory never corrupts the daemon's picture of itself.

A real ``portproxy serve`` whose state directory is a small tmpfs (or a read-only mount)
in a private mount namespace of its own: the disk is filled for real, and only that
tmpfs. A refused ``rm`` or CNI DEL leaves the mapping exactly as it was; mappings that
are not saved never write the state file; a start from a readable state serves on a
full or read-only disk, reports the failed save and retries it.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from tests.support.processes import PortproxyProcess
from tests.support.traffic import open_connection

SAVE_FULL = "cannot save state: No space left on device"
SAVE_READ_ONLY = "cannot save state: Read-only file system"
OWNER = {"kind": "cni", "id": "5a5b5c5d5e5f5a5b5c5d", "ifname": "eth0", "network": "podman"}
DOCKER = {"kind": "docker", "id": "d0c4e7d0c4e7d0c4e7d0c4e7"}


class Daemon:
    """``portproxy serve`` with its state directory on a 64 KiB tmpfs of its own mount namespace."""

    def __init__(self, topo, tmp_path: Path) -> None:
        self.topo = topo
        self.sock_dir = Path(tempfile.mkdtemp(prefix="portproxy-test-"))
        self.sock_dir.chmod(0o755)
        self.socket = self.sock_dir / "pp.sock"
        self.config = tmp_path / "portproxy.toml"
        self.config.write_text("")
        self.state_dir = tmp_path / "state"
        self.state_dir.mkdir()
        self.seed = tmp_path / "seed.json"
        self.proc: PortproxyProcess | None = None

    def start(self, saved: list[dict] | None = None, fill: bool = False, read_only: bool = False) -> PortproxyProcess:
        """Mount the tmpfs (with ``saved`` as the state file), optionally full or read-only, then exec serve."""
        script = 'mount -t tmpfs -o size=64k portproxy-test "$0"'
        if saved is not None:
            self.seed.write_text(json.dumps({"version": 2, "mappings": saved}))
            script += f' && cp {self.seed} "$0"/state.json'
        if fill:
            script += ' && { cat /dev/zero > "$0"/fill 2>/dev/null; true; }'
        if read_only:
            script += ' && mount -o remount,ro "$0"'
        prefix = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script + ' && exec "$@"',
                  str(self.state_dir)]
        self.proc = PortproxyProcess(self.topo.host, ["serve", "--config", str(self.config), "--state-dir",
                                                      str(self.state_dir), "--socket", str(self.socket)],
                                     ready_lines=1, prefix=prefix)
        return self.proc

    def inside(self, *argv: str) -> subprocess.CompletedProcess:
        """A command in the daemon's mount namespace (where its tmpfs is)."""
        assert self.proc is not None
        return subprocess.run(["nsenter", "-t", str(self.proc.proc.pid), "-m", "--", *argv], capture_output=True,
                              text=True, timeout=20)

    def fill(self) -> None:
        self.inside("sh", "-c", f"cat /dev/zero > {self.state_dir}/fill")
        probe = self.inside("dd", "if=/dev/zero", f"of={self.state_dir}/probe", "bs=4096", "count=1")
        assert "No space left" in probe.stderr, probe.stderr
        self.inside("rm", "-f", f"{self.state_dir}/probe")

    def free(self) -> None:
        assert self.inside("rm", "-f", f"{self.state_dir}/fill").returncode == 0

    def saved_specs(self) -> list[str]:
        return [m["spec"] for m in json.loads(self.inside("cat", f"{self.state_dir}/state.json").stdout)["mappings"]]

    def files(self) -> list[str]:
        return sorted(self.inside("ls", "-A", str(self.state_dir)).stdout.split())

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "portproxy", *args, "--socket", str(self.socket)],
                              capture_output=True, text=True, timeout=60)

    def ls(self) -> dict:
        result = self.cli("ls", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def specs(self) -> dict[str, dict]:
        return {m["spec"]: m for m in self.ls()["mappings"]}

    def api(self, *args: str, path: str = "/v1/mappings") -> tuple[int, dict]:
        out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", "--unix-socket", str(self.socket), *args,
                              f"http://portproxy{path}"], capture_output=True, text=True, timeout=20)
        body, _, status = out.stdout.rpartition("\n")
        return int(status), json.loads(body)

    def metric(self, name: str) -> float | None:
        def fetch() -> str:
            import http.client

            conn = http.client.HTTPConnection("127.0.0.1", 9779, timeout=10)
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
            conn.close()
            return text

        for line in self.topo.host.run(fetch).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
        shutil.rmtree(self.sock_dir, ignore_errors=True)


@pytest.fixture
def disk(topo, tmp_path):
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        pytest.skip("needs unshare and nsenter (util-linux)")
    d = Daemon(topo, tmp_path)
    yield d
    d.stop()


async def roundtrip(topo, port: int) -> None:
    reader, writer = await open_connection(topo.client, topo.host_ip, port)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
    writer.close()


def one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 1, result.stdout
    assert result.stderr.strip().splitlines() == [f"portproxy: {message}"], result.stderr


async def test_a_refused_rm_leaves_the_mapping_as_it_was(topo, tcp_echo, disk) -> None:
    proc = disk.start()
    ctr = topo.container_ip
    for spec, mode in ((f"9103:{ctr}:8080", "userland"), (f"9203:{ctr}:8080", "kernel")):
        assert disk.cli("add", spec, "--mode", mode).returncode == 0
    saved = disk.saved_specs()
    assert len(saved) == 2
    disk.fill()
    for port in (9103, 9203):
        one_line_error(disk.cli("rm", str(port)), SAVE_FULL)
    listing = disk.specs()
    assert sorted(listing) == sorted(saved)  # still listed
    assert {m["status"] for m in listing.values()} == {"running"}
    for port in (9103, 9203):
        await roundtrip(topo, port)  # still served
    assert disk.saved_specs() == saved  # still saved
    assert [f for f in disk.files() if f.endswith(".tmp")] == []  # the refused write left nothing behind
    disk.free()
    for port in (9103, 9203):  # still removable
        assert disk.cli("rm", str(port)).returncode == 0
    assert disk.specs() == {} and disk.saved_specs() == []
    for port in (9103, 9203):
        with pytest.raises(ConnectionRefusedError):
            await open_connection(topo.client, topo.host_ip, port)
    assert "Traceback" not in proc.stderr


async def test_docker_mappings_never_touch_the_state_file(topo, tcp_echo, disk) -> None:
    proc = disk.start()
    assert disk.cli("add", f"9104:{topo.container_ip}:8080").returncode == 0
    before = disk.inside("stat", "-c", "%Y.%i", f"{disk.state_dir}/state.json").stdout
    disk.fill()
    spec = f"0.0.0.0:9190:{topo.container_ip}:8080/tcp"
    assert disk.api("-X", "POST", "--data", json.dumps({"spec": spec, "owner": DOCKER}))[0] == 201
    await roundtrip(topo, 9190)
    assert disk.specs()[spec]["source"] == "docker"
    assert disk.api("-X", "DELETE", path=f"/v1/mappings?owner={DOCKER['id']}") == (200, {"removed": [spec]})
    assert spec not in disk.specs()
    with pytest.raises(ConnectionRefusedError):
        await open_connection(topo.client, topo.host_ip, 9190)
    assert disk.inside("stat", "-c", "%Y.%i", f"{disk.state_dir}/state.json").stdout == before
    assert disk.ls()["daemon"]["state_save_error"] is None
    assert "Traceback" not in proc.stderr


async def test_a_refused_cni_del_leaves_the_set_as_it_was(topo, tcp_echo, disk) -> None:
    proc = disk.start()
    spec = f"0.0.0.0:9105:{topo.container_ip}:8080/tcp"
    body = disk.state_dir.parent / "body.json"
    body.write_text(json.dumps({"owner": OWNER, "mappings": [{"spec": spec, "mode": "kernel"}]}))
    assert disk.api("-X", "PUT", "--data-binary", f"@{body}", path="/v1/owners/mappings")[0] == 200
    await roundtrip(topo, 9105)
    disk.fill()
    body.write_text(json.dumps({"owner": OWNER, "mappings": []}))
    status, answer = disk.api("-X", "PUT", "--data-binary", f"@{body}", path="/v1/owners/mappings")
    assert (status, answer) == (500, {"error": SAVE_FULL})
    assert disk.specs()[spec]["status"] == "running"
    assert disk.specs()[spec]["kernel"] is not None  # its DNAT is in
    await roundtrip(topo, 9105)
    assert disk.saved_specs() == [spec]
    disk.free()
    assert disk.api("-X", "PUT", "--data-binary", f"@{body}", path="/v1/owners/mappings") == (
        200, {"added": [], "removed": [spec], "kept": []})
    assert disk.specs() == {} and disk.saved_specs() == []
    assert "Traceback" not in proc.stderr


async def wait_until(predicate, timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def test_a_full_disk_does_not_stop_a_start_and_the_save_is_retried(topo, tcp_echo, disk) -> None:
    spec = f"0.0.0.0:9106:{topo.container_ip}:8080/tcp"
    proc = disk.start(saved=[{"spec": spec, "mode": "userland", "source": "api"}], fill=True)
    await roundtrip(topo, 9106)  # serving what the state file says
    listing = disk.ls()
    assert [m["spec"] for m in listing["mappings"]] == [spec]
    assert listing["daemon"]["state_save_error"] == SAVE_FULL
    assert disk.api(path="/v1/health")[1]["state_save_error"] == SAVE_FULL
    assert disk.metric("portproxy_state_save_failing") == 1
    assert disk.metric("portproxy_state_save_failures_total") >= 1
    assert "daemon: " + SAVE_FULL in disk.cli("ls").stdout
    lines = [line for line in proc.stderr_lines if "cannot save state" in line]
    assert len(lines) == 1 and SAVE_FULL in lines[0], proc.stderr
    assert [f for f in disk.files() if f.endswith(".tmp")] == []
    disk.free()
    await wait_until(lambda: disk.ls()["daemon"]["state_save_error"] is None, what="the save retried")
    assert disk.saved_specs() == [spec]
    assert disk.metric("portproxy_state_save_failing") == 0
    assert "Traceback" not in proc.stderr


async def test_a_read_only_state_directory_does_not_stop_a_start(topo, tcp_echo, disk) -> None:
    spec = f"0.0.0.0:9107:{topo.container_ip}:8080/tcp"
    proc = disk.start(saved=[{"spec": spec, "mode": "kernel", "source": "api"}], read_only=True)
    await roundtrip(topo, 9107)
    assert disk.ls()["daemon"]["state_save_error"] == SAVE_READ_ONLY
    one_line_error(disk.cli("rm", "9107"), SAVE_READ_ONLY)
    assert disk.specs()[spec]["status"] == "running"
    await roundtrip(topo, 9107)
    docker = f"0.0.0.0:9191:{topo.container_ip}:8080/tcp"
    assert disk.api("-X", "POST", "--data", json.dumps({"spec": docker, "owner": DOCKER}))[0] == 201
    await roundtrip(topo, 9191)
    assert "Traceback" not in proc.stderr
    # A second daemon on the same directory is still refused: the lock holds without its file.
    other = subprocess.run(["nsenter", "-t", str(proc.proc.pid), "-m", "-n", "--", sys.executable, "-m", "portproxy",
                            "serve", "--config", str(disk.config), "--state-dir", str(disk.state_dir), "--socket",
                            str(disk.sock_dir / "other.sock")], capture_output=True, text=True, timeout=30)
    assert other.returncode != 0
    assert "another portproxy" in other.stderr and "Traceback" not in other.stderr, other.stderr
