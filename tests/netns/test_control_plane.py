"""The control plane under abuse: what a hostile operator tries, each refused or survived, on a real
``portproxy serve`` in the host namespace, with real nftables and real competing processes."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys

import pytest

from tests.support.control import curl, ls, metrics_text, roundtrip, wait_for
from tests.support.nft import nft, tables


def holder(topo, port: int, proto: str = "tcp", reuse_port: bool = True, host: str = "0.0.0.0") -> socket.socket:
    sock = topo.host.socket(socket.AF_INET, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if proto == "tcp":
        sock.listen()
    return sock


# --- 1. a mapping that fails to start is never erased ----------------------------------------

async def test_failed_start_is_kept_shown_and_retried(topo, tcp_echo, daemon) -> None:
    start, cli = daemon
    ctr = topo.container_ip
    proc = start(f'[[mapping]]\nspec = "9411:{ctr}:8080"\nmode = "kernel"\n')
    assert cli("add", f"9412:{ctr}:8080", "--mode", "hybrid").returncode == 0
    assert cli("add", f"9413:{ctr}:8080").returncode == 0
    proc.stop()
    saved = json.loads(start.state.read_text())
    topo.host.sysctl("net/ipv4/ip_forward", "0")  # a boot before sysctl.d ran
    busy = holder(topo, 9413, reuse_port=False)  # another program on the port for a moment
    proc = start(f'[[mapping]]\nspec = "9411:{ctr}:8080"\nmode = "kernel"\n')
    try:
        listing = ls(cli)
        assert {spec: m["status"] for spec, m in listing.items()} == {
            f"9411:{ctr}:8080/tcp": "failed", f"9412:{ctr}:8080/tcp": "failed", f"9413:{ctr}:8080/tcp": "failed"}
        assert "ip_forward" in listing[f"9411:{ctr}:8080/tcp"]["error"]
        assert "port is already in use" in listing[f"9413:{ctr}:8080/tcp"]["error"]
        assert json.loads(start.state.read_text()) == saved  # nothing erased
        failed = [line for line in metrics_text(topo).splitlines() if line.startswith("portproxy_mapping_failed{")]
        assert len(failed) == 3 and all(line.endswith(" 1.0") for line in failed), failed
        assert "Traceback" not in proc.stderr
    finally:
        topo.host.sysctl("net/ipv4/ip_forward", "1")
        busy.close()
    await wait_for(lambda: all(m["status"] == "running" for m in ls(cli).values()), 20, "the retries")
    for port in (9411, 9412, 9413):
        await roundtrip(topo, port)
    proc.stop()
    assert json.loads(start.state.read_text()) == saved


# --- 2. mappings that cannot be ordered ------------------------------------------------------

async def test_mixed_wildcard_address_and_family_mappings(topo, tcp_echo, daemon) -> None:
    start, cli = daemon
    ctr, ctr6 = topo.container_ip, topo.container_ip6
    config = (f'[[mapping]]\nspec = "9095:{ctr}:8080"\nmode = "kernel"\n'
              f'[[mapping]]\nspec = "127.0.0.1:9091:{ctr}:8080"\n'
              f'[[mapping]]\nspec = "0.0.0.0:9090:{ctr}:8080"\n[[mapping]]\nspec = "[::]:9090:[{ctr6}]:8080"\n')
    proc = start(config)
    added = cli("add", f"10.99.99.99:9092:{ctr}:8080")
    assert added.returncode == 0, added.stderr
    assert cli("add", f"9092:{ctr}:8080/udp").returncode == 0
    assert len(ls(cli)) == 6
    proc.proc.send_signal(signal.SIGHUP)
    await roundtrip(topo, 9095)
    await roundtrip(topo, 9090)
    await roundtrip(topo, 9090, topo.host_ip6)
    proc.stop()
    assert "Traceback" not in proc.stderr
    assert "10.99.99.99 is not an address of this host" in proc.stderr
    assert tables(topo.host) == []
    proc = start(config)  # and a restart reads it all back
    assert len(ls(cli)) == 6


# --- 3. the nft table deleted under the daemon -------------------------------------------------

@pytest.mark.parametrize("vandalism", [["delete", "table", "inet", "portproxy"], ["flush", "ruleset"],
                                       ["flush", "chain", "inet", "portproxy", "dispatch"],
                                       ["flush", "map", "inet", "portproxy", "id4_any"]])
async def test_deleted_table_is_reinstalled(topo, tcp_echo, daemon, vandalism) -> None:
    start, cli = daemon
    ctr = topo.container_ip
    proc = start(f'[[mapping]]\nspec = "9090:{ctr}:8080"\nmode = "kernel"\n'
                 f'[[mapping]]\nspec = "9091:{ctr}:8080"\nmode = "hybrid"\n')
    await roundtrip(topo, 9090)
    assert nft(topo, *vandalism).returncode == 0
    await wait_for(lambda: "reinstalled" in proc.stderr, 15, "the table to be reinstalled")
    await roundtrip(topo, 9090)
    await roundtrip(topo, 9091)
    assert "portproxy_kernel_reconciles_total 1.0" in metrics_text(topo)
    listing = ls(cli)
    assert listing[f"9090:{ctr}:8080/tcp"]["kernel"] is not None
    # Changes made while the table is gone work too, and leave nothing half-done behind.
    assert nft(topo, *vandalism).returncode == 0
    assert cli("switch", "9090", "--mode", "userland").returncode == 0
    assert cli("switch", "9091", "--mode", "kernel").returncode == 0
    await roundtrip(topo, 9090)
    await roundtrip(topo, 9091)
    assert cli("switch", "9090", "--mode", "kernel").returncode == 0
    await roundtrip(topo, 9090)
    assert {spec: m["mode"] for spec, m in ls(cli).items()} == {
        f"9090:{ctr}:8080/tcp": "kernel", f"9091:{ctr}:8080/tcp": "kernel"}
    assert "Traceback" not in proc.stderr


# --- 4. nobody else on a daemon port ------------------------------------------------------------

async def test_ports_are_exclusive_on_every_path(topo, tcp_echo, daemon) -> None:
    start, cli = daemon
    ctr = topo.container_ip
    start()
    foreign = holder(topo, 9094)
    result = cli("add", f"9094:{ctr}:8080")
    assert result.returncode == 1 and "port is already in use" in result.stderr
    result = cli("add", f"9094:{ctr}:8080", "--mode", "kernel")
    assert result.returncode == 1 and "port is already in use" in result.stderr, result.stderr
    foreign.close()
    for port, mode in ((9095, "userland"), (9096, "kernel"), (9097, "hybrid")):
        assert cli("add", f"{port}:{ctr}:8080", "--mode", mode).returncode == 0
        for host in ("0.0.0.0", "127.0.0.1"):
            with pytest.raises(OSError):
                holder(topo, port, host=host)
    assert cli("add", f"9098:{ctr}:8080/udp", "--mode", "kernel").returncode == 0
    with pytest.raises(OSError):
        holder(topo, 9098, "udp")
    assert cli("rm", "9096").returncode == 0
    holder(topo, 9096).close()  # a removed mapping frees its port


# --- 5. one daemon per socket --------------------------------------------------------------------

def test_second_daemon_refuses_and_leaves_the_first_alone(topo, daemon, tmp_path) -> None:
    start, cli = daemon
    first = start()
    second = topo.host.popen([sys.executable, "-m", "portproxy", "serve", "--config", str(start.config),
                              "--state-dir", str(tmp_path / "other-state"), "--socket", str(start.socket),
                              "--metrics-addr", "127.0.0.1:9780"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = second.communicate(timeout=30)
    assert second.returncode == 1
    assert err.strip().splitlines() == [
        f"portproxy: another portproxy (pid {first.proc.pid}) is using the control socket {start.socket}"]
    assert cli("ls").returncode == 0


# --- 6 and 10. bad config and state: one line, nothing left behind -------------------------------

@pytest.mark.parametrize(("text", "message", "status"), [
    ('[options]\nmetrics_addr = "bogus"\n', "metrics_addr 'bogus' is not HOST:PORT", 2),
    ("options = 5\n", "[options]: must be a table", 2),
    ("[options]\nsocket_group = 5\n", "socket_group 5 must be a string", 2),
    ("[options]\nudp_timeout = 0\n", "udp_timeout 0 must be at least 1", 2),
    ("[options]\nconnect_timeout = nan\n", "connect_timeout nan must be a finite number", 2),
    ('[[mapping]]\nspec = "9090:172.16.1.1:8080"\nmod = "kernel"\n', "did you mean 'mode'", 2),
])
def test_bad_config_refused_before_anything_runs(topo, daemon, tmp_path, text, message, status) -> None:
    start, cli = daemon
    config = tmp_path / "bad.toml"
    config.write_text(text + '[[mapping]]\nspec = "9099:172.16.1.1:8080"\nmode = "kernel"\n')
    proc = topo.host.popen([sys.executable, "-m", "portproxy", "serve", "--config", str(config), "--state-dir",
                            str(tmp_path / "s"), "--socket", str(tmp_path / "s.sock")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == status
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert tables(topo.host) == []


def test_metrics_port_taken_leaves_no_dnat_and_no_socket(topo, daemon, tmp_path) -> None:
    start, cli = daemon
    busy = holder(topo, 9781, reuse_port=False, host="127.0.0.1")
    config = tmp_path / "c.toml"
    config.write_text('[options]\nmetrics_addr = "127.0.0.1:9781"\n'
                      '[[mapping]]\nspec = "9099:172.16.1.1:8080"\nmode = "kernel"\n')
    proc = topo.host.popen([sys.executable, "-m", "portproxy", "serve", "--config", str(config), "--state-dir",
                            str(tmp_path / "s"), "--socket", str(tmp_path / "s.sock")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=30)
    busy.close()
    assert proc.returncode == 1
    assert err.strip() == "portproxy: cannot serve metrics on 127.0.0.1:9781: Address already in use"
    assert tables(topo.host) == [] and not (tmp_path / "s.sock").exists()


@pytest.mark.parametrize("content", [
    "[]", "{", '{"mappings": 5}', '{"mappings": [{"spec": "x"}]}', "[" * 100000,
    '{"mappings": [{"spec": "9090:10.0.0.1:80", "options": []}]}', '{"version": 99, "mappings": []}',
    '{"mappings": [{"spec": "9090:10.0.0.1:80"}, {"spec": "9090:10.0.0.1:80/tcp", "mode": "kernel"}]}'])
def test_unreadable_state_refused_and_kept(topo, daemon, tmp_path, content) -> None:
    start, cli = daemon
    state = tmp_path / "state" / "state.json"
    state.parent.mkdir()
    state.write_text(content)
    proc = topo.host.popen([sys.executable, "-m", "portproxy", "serve", "--config", str(start.config),
                            "--state-dir", str(state.parent), "--socket", str(tmp_path / "s.sock")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start.config.write_text("")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert len(err.strip().splitlines()) == 1 and str(state) in err and len(err) < 600, err
    assert state.read_text() == content


def test_unprivileged_serve_is_one_line(topo, tmp_path) -> None:
    result = topo.host.run(lambda: subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", sys.executable, "-m", "portproxy",
         "serve", "--config", "/nonexistent-portproxy.toml", "--state-dir", "/var/lib/portproxy-test-nobody",
         "--socket", "/run/portproxy-test-nobody/pp.sock"], capture_output=True, text=True, timeout=30))
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr


# --- 7. reloads that fail say so -------------------------------------------------------------------

async def test_failed_reload_is_logged_and_answered(topo, tcp_echo, daemon) -> None:
    start, cli = daemon
    ctr = topo.container_ip
    proc = start(f'[[mapping]]\nspec = "9090:{ctr}:8080"\n')
    start.config.write_text("options = 5\n")
    proc.proc.send_signal(signal.SIGHUP)
    await wait_for(lambda: "reload refused" in proc.stderr, 10, "the reload's log line")
    result = cli("reload")
    assert result.returncode == 1 and "[options]: must be a table" in result.stderr
    start.config.write_text(f'[options]\nudp_timeout = 30\n[[mapping]]\nspec = "9090:{ctr}:8080"\n')
    result = cli("reload", "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["restart_required"] == ["udp_timeout"]
    assert "udp_timeout changed; they take effect at the next restart" in proc.stderr
    busy = holder(topo, 9093, reuse_port=False)
    start.config.write_text(f'[[mapping]]\nspec = "9090:{ctr}:8080"\n[[mapping]]\nspec = "9093:{ctr}:8080"\n')
    result = cli("reload")
    assert result.returncode == 1 and "port is already in use" in result.stderr
    assert ls(cli)[f"9093:{ctr}:8080/tcp"]["status"] == "failed"  # kept, and retried
    busy.close()
    await wait_for(lambda: ls(cli)[f"9093:{ctr}:8080/tcp"]["status"] == "running", 15, "the retry")
    await roundtrip(topo, 9093)
    await roundtrip(topo, 9090)


# --- 10. the API's edges ---------------------------------------------------------------------------


def test_api_answers_json_for_every_error(topo, daemon) -> None:
    start, cli = daemon
    start()
    sock = start.socket
    assert curl(sock, path="/v2/nothing")[0] == 404
    assert curl(sock, "-X", "PUT")[0] == 405
    status, body = curl(sock, "-X", "POST", "-d", "[" * 20000 + "]" * 20000)
    assert status == 400 and "error" in body
    status, body = curl(sock, "-X", "POST", "-d", json.dumps({"spec": "9090:" + "9" * 60000}))
    assert status in (400, 413) and len(body["error"]) < 300
    status, body = curl(sock, "-X", "POST", "-d", json.dumps({"spec": "9090:10.0.0.1:80", "mod": "kernel"}))
    assert status == 400 and "did you mean 'mode'" in body["error"]
    status, body = curl(sock, "-X", "POST", "-d", json.dumps({"spec": "9090:10.0.0.1:80", "udp_timeout": 0}))
    assert status == 400 and "udp_timeout" in body["error"]
    assert curl(sock, "-X", "DELETE", path="/v1/mappings?owner=nobody") == (200, {"removed": []})


async def test_kernel_ids_survive_a_restart(topo, tcp_echo, daemon) -> None:
    start, cli = daemon
    ctr = topo.container_ip
    proc = start()
    for port in (9090, 9091, 9092):
        assert cli("add", f"{port}:{ctr}:8080", "--mode", "kernel").returncode == 0
    assert cli("rm", "9090").returncode == 0

    def ids() -> dict:
        out = json.loads(nft(topo, "-j", "list", "map", "inet", "portproxy", "id4_any").stdout)
        elems = next(item["map"] for item in out["nftables"] if "map" in item).get("elem", [])
        return {json.dumps(e[0]): e[1] for e in elems}

    before = ids()
    proc.stop()
    start()
    assert ids() == before


def test_map_kernel_refuses_a_held_port_and_holds_its_own(topo, portproxy) -> None:
    busy = holder(topo, 9200)
    result = portproxy("map", "--mode", "kernel", f"9200:{topo.container_ip}:8080", ready=None)
    assert result.proc.wait(timeout=30) == 1
    assert result.stderr.strip() == "portproxy: cannot listen on 0.0.0.0:9200/tcp: port is already in use"
    assert tables(topo.host) == []
    busy.close()
    running = portproxy("map", "--mode", "kernel", f"9201:{topo.container_ip}:8080")
    with pytest.raises(OSError):
        holder(topo, 9201)
    assert running.stop() == 0
    holder(topo, 9201).close()


async def test_no_host_address_publishes_both_families_ls_says_how(topo, tcp_echo, daemon) -> None:
    """Docker's -p: IPv4 through the DNAT, IPv6 clients of an IPv4 target through the proxy."""
    start, cli = daemon
    ctr = topo.container_ip
    start(f'[[mapping]]\nspec = "9090:{ctr}:8080"\nmode = "kernel"\n')
    assert ls(cli)[f"9090:{ctr}:8080/tcp"]["families"] == {"ipv4": "kernel", "ipv6": "userland"}
    await roundtrip(topo, 9090)
    await roundtrip(topo, 9090, topo.host_ip6)
    assert cli("switch", "9090", "--mode", "userland").returncode == 0
    assert ls(cli)[f"9090:{ctr}:8080/tcp"]["families"] == {"ipv4": "userland", "ipv6": "userland"}
    await roundtrip(topo, 9090, topo.host_ip6)


def test_socket_path_that_is_not_a_socket_is_never_replaced(topo, daemon, tmp_path) -> None:
    start, cli = daemon
    precious = tmp_path / "precious.toml"
    precious.write_text("# the operator's config\n")
    proc = topo.host.popen([sys.executable, "-m", "portproxy", "serve", "--config", str(start.config),
                            "--state-dir", str(tmp_path / "s"), "--socket", str(precious)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start.config.write_text("")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and err.strip() == f"portproxy: {precious} exists and is not a socket; refusing to replace it"
    assert precious.read_text() == "# the operator's config\n"


def test_one_writer_per_nft_table(topo, daemon, portproxy) -> None:
    start, cli = daemon
    start(f'[[mapping]]\nspec = "9090:{topo.container_ip}:8080"\nmode = "kernel"\n')
    other = portproxy("map", "--mode", "kernel", f"9300:{topo.container_ip}:8080", ready=None)
    assert other.proc.wait(timeout=30) == 1
    assert "another portproxy (pid " in other.stderr and "nft table inet portproxy" in other.stderr
    assert ls(cli)[f"9090:{topo.container_ip}:8080/tcp"]["kernel"] is not None


async def test_loopback_address_on_the_kernel_path_is_proxied(topo, tcp_echo, daemon) -> None:
    """DNAT cannot take 127.0.0.1 without route_localnet: that part is served by the proxy."""
    start, cli = daemon
    start(f'[[mapping]]\nspec = "127.0.0.1:9301:{topo.container_ip}:8080"\nmode = "kernel"\n')
    assert ls(cli)[f"127.0.0.1:9301:{topo.container_ip}:8080/tcp"]["families"] == {"ipv4": "userland"}

    def roundtrip_loopback() -> bytes:
        sock = topo.host.socket()
        sock.settimeout(10)
        sock.connect(("127.0.0.1", 9301))
        sock.sendall(b"lo")
        data = sock.recv(2)
        sock.close()
        return data

    assert await asyncio.to_thread(roundtrip_loopback) == b"lo"
