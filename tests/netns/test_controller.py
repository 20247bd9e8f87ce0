"""The controller daemon: a real ``portproxy serve`` in the host namespace, driven through its socket."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import subprocess
import sys

import pytest

from tests.support.traffic import open_connection, udp_endpoint
from tests.support.control import ls
from tests.support.nft import _table_elements, tables


async def cli_async(cli, *args: str) -> subprocess.CompletedProcess:
    return await asyncio.to_thread(cli, *args)


# --- the heart: switching under load -------------------------------------------------------

class Load:
    """Long-lived verified streams, a steady stream of short connections and live UDP flows."""

    def __init__(self, topo, tcp_port: int, udp_port: int) -> None:
        self.topo = topo
        self.tcp_port = tcp_port
        self.udp_port = udp_port
        self.stop = asyncio.Event()
        self.failures: list[str] = []
        self.long_bytes = 0
        self.short_ok = 0
        self.udp_ok = 0
        self.tasks: list[asyncio.Task] = []

    def fail(self, what: str) -> None:
        self.failures.append(f"{what} at {time.monotonic():.2f}")

    def start_long(self, n: int) -> None:
        base = sum(1 for t in self.tasks if t.get_name().startswith("long"))
        self.tasks += [asyncio.create_task(self._long(base + i), name=f"long{base + i}") for i in range(n)]

    def start_short(self, parallel: int) -> None:
        self.tasks += [asyncio.create_task(self._short()) for _ in range(parallel)]

    def start_udp(self, flows: int) -> None:
        self.tasks += [asyncio.create_task(self._udp(i)) for i in range(flows)]

    async def _long(self, i: int) -> None:
        try:
            reader, writer = await open_connection(self.topo.client, self.topo.host_ip, self.tcp_port)
        except OSError as exc:
            self.fail(f"long {i}: connect: {exc!r}")
            return
        try:
            while not self.stop.is_set():
                chunk = os.urandom(8192)
                writer.write(chunk)
                await writer.drain()
                echoed = await asyncio.wait_for(reader.readexactly(len(chunk)), 20)
                if echoed != chunk:
                    self.fail(f"long {i}: corrupted bytes")
                    return
                self.long_bytes += len(chunk)
                await asyncio.sleep(0.02)
            writer.write_eof()
            if await asyncio.wait_for(reader.read(), 20) != b"":
                self.fail(f"long {i}: bytes after EOF")
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            self.fail(f"long {i}: {exc!r}")
        finally:
            writer.close()

    async def _short(self) -> None:
        while not self.stop.is_set():
            payload = os.urandom(200)
            try:
                reader, writer = await open_connection(self.topo.client, self.topo.host_ip, self.tcp_port)
                writer.write(payload)
                writer.write_eof()
                echoed = await asyncio.wait_for(reader.read(), 20)
                writer.close()
            except (OSError, asyncio.TimeoutError) as exc:
                self.fail(f"short: {exc!r}")
                continue
            if echoed != payload:
                self.fail("short: wrong echo")
            else:
                self.short_ok += 1
            await asyncio.sleep(0.01)

    async def _udp(self, i: int) -> None:
        endpoint = await udp_endpoint(self.topo.client)
        seq = 0
        while not self.stop.is_set():
            seq += 1
            message = b"flow %d seq %d" % (i, seq)
            for _attempt in range(5):  # UDP may drop a datagram in flight at the moment of a switch
                endpoint.transport.sendto(message, (self.topo.host_ip, self.udp_port))
                try:
                    while True:
                        data, _ = await endpoint.recv(timeout=0.5)
                        if data == message:
                            break
                    self.udp_ok += 1
                    break
                except asyncio.TimeoutError:
                    continue
            else:
                self.fail(f"udp {i}: no answer to seq {seq}")
            await asyncio.sleep(0.05)
        endpoint.transport.close()

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)


async def test_switch_under_load_loses_nothing(topo, tcp_echo, udp_echo, daemon) -> None:
    start, cli = daemon
    proc = start('[[mapping]]\nspec = "9090:172.16.1.1:8080"\n[[mapping]]\nspec = "5353:172.16.1.1:5353/udp"\n')
    load = Load(topo, 9090, 5353)
    load.start_long(60)  # these start on the userland path
    load.start_short(4)
    load.start_udp(4)
    await asyncio.sleep(1.0)
    modes = ["kernel", "userland", "kernel", "hybrid", "userland", "hybrid", "kernel", "userland",
             "kernel", "userland", "hybrid", "userland"]
    switch_log: list = []
    for n, mode in enumerate(modes):
        for name in ("9090/tcp", "5353/udp"):
            switch_log.append((name, mode, round(time.monotonic(), 2)))
            result = await cli_async(cli, "switch", name, "--mode", mode)
            assert result.returncode == 0, result.stderr
        if n == 0:
            load.start_long(50)  # these start on the kernel path
        await asyncio.sleep(0.7)
    assert ls(cli)["9090:172.16.1.1:8080/tcp"]["mode"] == "userland"
    await asyncio.sleep(0.5)
    await load.finish()
    print("switch log", switch_log)
    print("failures", *load.failures, sep="\n")
    print("DAEMON", "".join(line for line in proc.stderr_lines if "pyroute2" not in line))
    assert load.failures == []
    assert load.long_bytes > 110 * 8192 and load.short_ok > 50 and load.udp_ok > 50


async def test_auto_moves_to_the_kernel_under_load_and_back_when_cool_losing_nothing(
        topo, tcp_echo, udp_echo, daemon) -> None:
    """An auto mapping moves itself: to hybrid (DNAT) while streams load it, back to the
    proxy once it has been cool; connections proxied before a move finish there, no
    connection fails, no byte is lost; ls and the metrics show where it is and each move."""
    from tests.support.control import metrics_text, wait_for

    start, cli = daemon
    tcp, udp = f"9090:{topo.container_ip}:8080/tcp", f"5353:{topo.container_ip}:5353/udp"
    start("[options]\nauto_bytes_per_second = 200000\nauto_connections_per_second = 1000\n"
          "auto_cool_seconds = 3\n"
          f'[[mapping]]\nspec = "{tcp}"\nmode = "auto"\n[[mapping]]\nspec = "{udp}"\nmode = "auto"\n')
    listing = ls(cli)
    assert listing[tcp]["mode"] == "auto" and listing[tcp]["auto"]["on"] == "userland", listing[tcp]
    assert listing[tcp]["families"]["ipv4"] == "userland"
    load = Load(topo, 9090, 5353)
    load.start_long(20)  # ~400 KB/s each, both ways: past the threshold
    load.start_short(2)
    load.start_udp(2)
    await wait_for(lambda: ls(cli)[tcp]["auto"]["on"] == "hybrid", timeout=30, what="the move to the kernel")
    hot = ls(cli)[tcp]
    assert hot["families"]["ipv4"] == "hybrid" and hot["kernel"] is not None, hot
    assert ls(cli)[udp]["auto"]["on"] == "userland"  # its load is light: it stays
    load.start_long(5)  # these are translated
    await asyncio.sleep(1.5)
    await load.finish()
    await wait_for(lambda: ls(cli)[tcp]["auto"]["on"] == "userland", timeout=30, what="the move back")
    assert load.failures == [], load.failures
    assert load.long_bytes > 25 * 8192 and load.short_ok > 10 and load.udp_ok > 10
    cool = ls(cli)[tcp]
    assert cool["auto"]["moves"] == 2 and cool["families"]["ipv4"] == "userland" and "kernel" not in cool
    text = metrics_text(topo)
    assert f'portproxy_auto_moves_total{{listen="*:9090",proto="tcp",target="{topo.container_ip}:8080"}} 2.0' \
        in text, [line for line in text.splitlines() if "auto" in line]
    assert 'portproxy_mapping_mode{listen="*:9090",mode="auto"' in text
    assert cli("switch", "9090/tcp", "--mode", "kernel").returncode == 0  # an auto mapping can be pinned
    assert "auto" not in ls(cli)[tcp]


async def test_auto_is_refused_with_a_proxy_header(topo, tcp_echo, daemon) -> None:
    start, cli = daemon
    start()
    result = cli("add", f"9090:{topo.container_ip}:8080", "--mode", "auto", "--proxy-protocol", "v2")
    assert result.returncode == 1 and "DNAT cannot add a header (mode auto)" in result.stderr, result.stderr
    assert ls(cli) == {}


# --- operations and errors -----------------------------------------------------------------------

async def test_add_rm_and_api_errors(topo, tcp_echo, daemon) -> None:
    start, cli = daemon
    start()
    assert ls(cli) == {}
    assert cli("add", f"9090:{topo.container_ip}:8080").returncode == 0
    assert cli("add", f"9091:{topo.container_ip}:8080", "--mode", "kernel").returncode == 0
    assert cli("add", f"9091:{topo.container_ip}:8080/udp").returncode == 0
    for port in (9090, 9091):
        reader, writer = await open_connection(topo.client, topo.host_ip, port)
        writer.write(b"hi")
        assert await reader.readexactly(2) == b"hi"
        writer.close()
    cases = [
        (("add", "9092:not-an-ip:80"), "target address 'not-an-ip'"),
        (("add", f"9090:{topo.container_ip}:8081"), "overlap"),
        (("rm", "9999"), "no mapping on port 9999"),
        (("rm", "9091"), "ambiguous"),
        (("rm", "banana"), "neither a mapping spec"),
        (("switch", "9093", "--mode", "kernel"), "no mapping on port 9093"),
    ]
    for args, message in cases:
        result = cli(*args)
        assert result.returncode == 1, args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)
    assert cli("rm", "9091/udp").returncode == 0
    assert sorted(ls(cli)) == [f"9090:{topo.container_ip}:8080/tcp", f"9091:{topo.container_ip}:8080/tcp"]
    # Raw HTTP errors, as curl sees them.
    sock = str(daemon[0].socket)
    for args, status in ((["-X", "POST", "-d", "not json"], 400),
                         (["-X", "POST", "-d", '{"spec": "9095:10.0.0.1:80", "mode": "warp"}'], 400),
                         (["-X", "DELETE"], 400)):
        out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket", sock, *args,
                              "http://portproxy/v1/mappings"], capture_output=True, text=True, timeout=20)
        assert out.stdout == str(status), args
    # The state on disk matches.
    state = json.loads(daemon[0].state.read_text())
    assert {m["spec"]: m["mode"] for m in state["mappings"]} == {
        f"9090:{topo.container_ip}:8080/tcp": "userland", f"9091:{topo.container_ip}:8080/tcp": "kernel"}


async def test_port_in_use_fails_cleanly(topo, tcp_echo, daemon) -> None:
    start, cli = daemon
    start(f'[[mapping]]\nspec = "9090:{topo.container_ip}:8080"\n')
    holder = topo.host.socket()
    holder.bind(("0.0.0.0", 9097))
    holder.listen()
    reader, writer = await open_connection(topo.client, topo.host_ip, 9090)
    result = cli("add", f"9097:{topo.container_ip}:8080")
    assert result.returncode == 1
    assert result.stderr.strip() == "portproxy: cannot listen on 0.0.0.0:9097/tcp: port is already in use"
    writer.write(b"alive")
    assert await reader.readexactly(5) == b"alive"
    assert list(ls(cli)) == [f"9090:{topo.container_ip}:8080/tcp"]
    writer.close()
    holder.close()


def test_unprivileged_peer_refused(topo, daemon) -> None:
    start, cli = daemon
    start()
    os.chmod(daemon[0].socket, 0o666)  # let the kernel pass it; the daemon itself must refuse
    result = cli("ls", prefix=["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"])
    assert result.returncode == 1
    assert "uid 65534 may not use this socket" in result.stderr


async def test_sighup_touches_only_changed_mappings(topo, tcp_echo, daemon) -> None:
    start, cli = daemon
    ctr = topo.container_ip
    proc = start(f'[[mapping]]\nspec = "9090:{ctr}:8080"\n[[mapping]]\nspec = "9091:{ctr}:8080"\n'
                 f'[[mapping]]\nspec = "9092:{ctr}:8080"\n')
    assert cli("add", f"9093:{ctr}:8080").returncode == 0  # API-owned: reload leaves it alone
    kept_r, kept_w = await open_connection(topo.client, topo.host_ip, 9090)
    switched_r, switched_w = await open_connection(topo.client, topo.host_ip, 9091)
    daemon[0].config.write_text(f'[[mapping]]\nspec = "9090:{ctr}:8080"\n[[mapping]]\nspec = "9091:{ctr}:8080"\n'
                                f'mode = "kernel"\n[[mapping]]\nspec = "9094:{ctr}:8080"\n')
    proc.proc.send_signal(signal.SIGHUP)
    for _ in range(100):
        modes = {spec: m["mode"] for spec, m in ls(cli).items()}
        if f"9094:{ctr}:8080/tcp" in modes and f"9092:{ctr}:8080/tcp" not in modes:
            break
        await asyncio.sleep(0.1)
    assert modes == {f"9090:{ctr}:8080/tcp": "userland", f"9091:{ctr}:8080/tcp": "kernel",
                     f"9093:{ctr}:8080/tcp": "userland", f"9094:{ctr}:8080/tcp": "userland"}
    # The untouched mapping's connection never noticed; the switched one kept working too.
    for reader, writer in ((kept_r, kept_w), (switched_r, switched_w)):
        writer.write(b"still")
        assert await reader.readexactly(5) == b"still"
        writer.close()
    with pytest.raises(ConnectionRefusedError):
        await open_connection(topo.client, topo.host_ip, 9092)
    proc.stop()
    assert "reloaded" in proc.stderr


async def test_kill_9_then_restart_no_duplicates_or_orphans(topo, tcp_echo, daemon) -> None:
    start, cli = daemon
    ctr = topo.container_ip
    proc = start(f'[[mapping]]\nspec = "9090:{ctr}:8080"\nmode = "kernel"\n')
    assert cli("add", f"9091:{ctr}:8080", "--mode", "kernel").returncode == 0
    assert cli("add", f"9092:{ctr}:8080").returncode == 0
    before = _table_elements(topo)
    assert len(before["id4_any"]) == 2
    proc.proc.kill()
    proc.proc.wait()
    assert ("inet", "portproxy") in tables(topo.host)  # a crash leaves the rules behind...
    start(f'[[mapping]]\nspec = "9090:{ctr}:8080"\nmode = "kernel"\n')
    after = _table_elements(topo)  # ...and the restart replaces them, not adds to them
    assert after == before
    assert set(ls(cli)) == {f"909{i}:{ctr}:8080/tcp" for i in range(3)}
    for port in (9090, 9091, 9092):
        reader, writer = await open_connection(topo.client, topo.host_ip, port)
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        writer.close()
    assert cli("rm", "9091").returncode == 0
    assert cli("rm", "9090").returncode == 0
    assert _table_elements(topo)["id4_any"] == []
    assert _table_elements(topo)["targets4"] == []


async def test_leftover_table_removed_when_nothing_is_kernel(topo, daemon) -> None:
    start, cli = daemon
    proc = start(f'[[mapping]]\nspec = "9090:{topo.container_ip}:8080"\nmode = "kernel"\n')
    proc.proc.kill()
    proc.proc.wait()
    daemon[0].state.unlink()
    start(f'[[mapping]]\nspec = "9090:{topo.container_ip}:8080"\n')
    assert tables(topo.host) == []


def test_stop_removes_rules_unless_kept(topo, daemon) -> None:
    start, cli = daemon
    proc = start(f'[[mapping]]\nspec = "9090:{topo.container_ip}:8080"\nmode = "hybrid"\n')
    assert proc.stop() == 0
    assert tables(topo.host) == []
    proc = start(f'[options]\nkeep_kernel_rules = true\n[[mapping]]\nspec = "9090:{topo.container_ip}:8080"\n'
                 'mode = "kernel"\n')
    assert proc.stop() == 0
    assert tables(topo.host) == [("inet", "portproxy")]


def test_bad_config_one_line_exit_2(topo, daemon, tmp_path) -> None:
    start, cli = daemon
    config = tmp_path / "bad.toml"
    for text, message in (('[[mapping]]\nspec = "9090:1.2.3"\n', "mapping #1"),
                          ('[options]\nbogus = 1\n', "unknown option 'bogus'"),
                          ('[options]\ntarget_cc = "warp"\n', "target_cc 'warp' cannot be used: not available"),
                          ('[[mapping]]\nspec = "9090:10.0.0.1:80"\nmode = "warp"\n', "mode 'warp'"),
                          ("not toml [", "bad.toml")):
        config.write_text(text)
        proc = topo.host.popen([sys.executable, "-m", "portproxy", "serve", "--config", str(config), "--state-dir",
                                str(tmp_path / "s"), "--socket", str(tmp_path / "s.sock")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 2
        assert len(err.strip().splitlines()) == 1 and message in err, err
