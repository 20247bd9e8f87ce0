"""Transparent mode (``--source client``): the target sees the client's own address and port.

A real ``portproxy map --source client`` in the host namespace of a fresh topology, with
the real kernel's policy routing and the real nft. The pure parts (fallback decisions,
builders, option checks) are tests/unit/test_transparent_pure.py.
"""

from __future__ import annotations

import socket
import subprocess
import sys


from tests.support.traffic import start_server, start_udp_echo, udp_endpoint
from portproxy.kernel.transparent_rules import (TransparentOptions, delete_commands)
from tests.support.namespaces import add_container
from tests.support.transparent import host_state, peer_reporter, seen_by_target

# --- real namespaces -------------------------------------------------------------------------------


EMPTY = {"rules": [], "routes": [], "nft": []}


async def test_tcp_target_sees_client_ipv4_and_ipv6(topo, portproxy) -> None:
    v4 = await start_server(topo.container, 8080, peer_reporter)
    v6 = await start_server(topo.container, 8080, peer_reporter, host="::")
    assert host_state(topo) == EMPTY
    proxy = portproxy("map", f"9090:{topo.container_ip}:8080", f"[::]:9096:[{topo.container_ip6}]:8080",
                      "--source", "client", ready=2)
    try:
        state = host_state(topo)
        assert state == {"rules": [7719, 7719], "routes": [socket.AF_INET, socket.AF_INET6],
                         "nft": ["portproxy_transparent"]}
        for _ in range(3):
            ip, port, local = await seen_by_target(topo.client, topo.host_ip, 9090)
            assert (ip, port) == (topo.client_ip, local[1])
        ip, port, local = await seen_by_target(topo.client, topo.host_ip6, 9096)
        assert (ip, port) == (topo.client_ip6, local[1])
    finally:
        assert proxy.stop() == 0
        v4.close()
        v6.close()
    assert host_state(topo) == EMPTY, proxy.stderr


async def test_udp_target_sees_client_ipv4_and_ipv6(topo, portproxy) -> None:
    servers = [await start_udp_echo(topo.container, 5353), await start_udp_echo(topo.container, 5353, "::")]
    portproxy("map", f"5353:{topo.container_ip}:5353/udp", f"[::]:5354:[{topo.container_ip6}]:5353/udp",
              "--source", "client", ready=2)
    try:
        for family_ip, host, port in ((topo.client_ip, topo.host_ip, 5353), (topo.client_ip6, topo.host_ip6, 5354)):
            client = await udp_endpoint(topo.client, "::" if ":" in host else "0.0.0.0")
            client.transport.sendto(b"whoami", (host, port))
            data, _ = await client.recv()
            local_port = client.transport.get_extra_info("sockname")[1]
            assert data.decode() == f"{family_ip} {local_port}"
            client.transport.sendto(b"echo", (host, port))
            assert (await client.recv())[0] == b"echo"
            client.transport.close()
    finally:
        for server in servers:
            server.close()


async def test_loopback_client_falls_back_to_host_address(topo, portproxy) -> None:
    server = await start_server(topo.container, 8080, peer_reporter)
    proxy = portproxy("map", f"9090:{topo.container_ip}:8080", "--source", "client", "--metrics-addr",
                      "127.0.0.1:9779")
    try:
        for _ in range(2):
            ip, _port, _local = await seen_by_target(topo.host, "127.0.0.1", 9090)
            assert ip == topo.bridge_ip
        ip, port, local = await seen_by_target(topo.client, topo.host_ip, 9090)
        assert (ip, port) == (topo.client_ip, local[1])

        def scrape() -> str:
            import urllib.request

            return urllib.request.urlopen("http://127.0.0.1:9779/metrics", timeout=10).read().decode()

        metrics = topo.host.run(scrape)
        assert 'portproxy_source_fallbacks_total{listen="*:9090",proto="tcp",reason="loopback",' \
               f'target="{topo.container_ip}:8080"}} 2.0' in metrics
    finally:
        proxy.stop()
        server.close()
    assert proxy.stderr.count("cannot be the source toward the target (loopback)") == 1, proxy.stderr


async def test_container_on_the_same_bridge_falls_back(topo, portproxy) -> None:
    """Another container reaching the published port: spoofing its address toward the
    target would make the target answer it directly, so it comes from the host instead."""
    other = add_container(topo, "pt-c2", "172.16.1.2", "fd00:172:16::2", "vc1")
    server = await start_server(topo.container, 8080, peer_reporter)
    proxy = portproxy("map", f"9090:{topo.container_ip}:8080", "--source", "client")
    try:
        ip, _port, _local = await seen_by_target(other, topo.host_ip, 9090)
        assert ip == topo.bridge_ip
        ip, port, local = await seen_by_target(topo.client, topo.host_ip, 9090)
        assert (ip, port) == (topo.client_ip, local[1])
    finally:
        proxy.stop()
        server.close()
    assert "(same_link)" in proxy.stderr, proxy.stderr


async def test_without_net_admin_one_line_and_nothing_left(topo, portproxy) -> None:
    capsh = ["capsh", "--drop=cap_net_admin", "--", "-c", 'exec "$0" "$@"']
    proxy = portproxy("map", f"9090:{topo.container_ip}:8080", "--source", "client", ready=None, prefix=capsh)
    assert proxy.proc.wait(timeout=60) == 1
    proxy.stop()
    lines = proxy.stderr.strip().splitlines()
    assert len(lines) == 1 and "CAP_NET_ADMIN" in lines[0], proxy.stderr
    assert host_state(topo) == EMPTY


async def test_conflicting_table_is_refused_and_left_alone(topo, portproxy) -> None:
    def add_foreign_rule() -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            ipr.rule("add", table=7719, priority=500, src="10.9.0.0", src_len=16, family=socket.AF_INET)

    topo.host.run(add_foreign_rule)
    proxy = portproxy("map", f"9090:{topo.container_ip}:8080", "--source", "client", ready=None)
    assert proxy.proc.wait(timeout=60) == 1
    proxy.stop()
    assert "routing table 7719 is already used" in proxy.stderr and len(proxy.stderr.strip().splitlines()) == 1
    assert host_state(topo) == {"rules": [500], "routes": [], "nft": []}


def test_bad_mark_exit_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "portproxy", "map", "9090:172.16.1.1:8080", "--source", "client",
                           "--transparent-mark", "0x1/0xff00"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "argument --transparent-mark: '0x1/0xff00' transparent mark 0x1 must be non-zero and inside its mask" \
        in proc.stderr
    assert "Traceback" not in proc.stderr


def test_reconcile_recreates_deleted_pieces(topo) -> None:
    """What the daemon's reconcile relies on: present() sees a deleted piece, install() puts
    back exactly what is missing, remove() leaves nothing."""
    from portproxy.kernel.executor import Nft
    from portproxy.kernel.transparent import TransparentRouting
    from portproxy.kernel.transparent_rules import rule_args

    def scenario() -> list[bool]:
        from pyroute2 import IPRoute

        routing = TransparentRouting(TransparentOptions())
        seen = []
        routing.install()
        try:
            seen.append(routing.present())
            with IPRoute() as ipr:
                ipr.rule("del", **rule_args(routing.opts, socket.AF_INET))
            seen.append(routing.present())
            routing.install()
            seen.append(routing.present())
            Nft().apply(delete_commands(routing.opts))
            seen.append(routing.present())
            routing.install()
            seen.append(routing.present())
        finally:
            routing.remove()
        return seen

    assert topo.host.run(scenario) == [True, False, True, False, True]
    assert host_state(topo) == EMPTY


SHADOW = ["pref", "100", "fwmark", "0x1d000000/0xff000000", "lookup", "main"]
SHADOW_NAMED = "IPv4 ip rule '100: from all fwmark 0x1d000000/0xff000000 lookup main' comes before"


def ip_rule(topo, verb: str, *args: str) -> None:
    assert topo.host.popen(["ip", "rule", verb, *args]).wait(10) == 0


def test_a_rule_taking_the_replies_first_is_refused_by_name(topo, portproxy) -> None:
    ip_rule(topo, "add", *SHADOW)
    proxy = portproxy("map", f"9090:{topo.container_ip}:8080", "--source", "client", ready=None)
    assert proxy.proc.wait(timeout=60) == 1
    proxy.stop()
    lines = proxy.stderr.strip().splitlines()
    assert len(lines) == 1 and SHADOW_NAMED in lines[0], proxy.stderr
    assert host_state(topo) == EMPTY  # nothing of ours installed; the foreign rule left alone
    rules = topo.host.popen(["ip", "rule", "show", "pref", "100"], stdout=subprocess.PIPE, text=True).communicate()[0]
    assert "fwmark 0x1d000000/0xff000000 lookup main" in rules


def test_a_shadowing_rule_added_later_is_the_routings_problem(topo) -> None:
    """What the reconcile loop asks: problem() names a rule added after install; present()
    still says every piece is there (installing again would not help)."""
    from portproxy.kernel.transparent import SharedRouting

    def scenario() -> list:
        routing = SharedRouting(TransparentOptions())
        routing.acquire()
        try:
            seen = [routing.problem(), routing.present()]
            ip_rule(topo, "add", *SHADOW)
            seen += [routing.problem(), routing.present()]
            ip_rule(topo, "del", *SHADOW)
            seen.append(routing.problem())
        finally:
            routing.release()
        return seen

    before, present, problem, still_present, after = topo.host.run(scenario)
    assert (before, present, still_present, after) == (None, True, True, None)
    assert problem is not None and SHADOW_NAMED in problem
    assert host_state(topo) == EMPTY


async def test_the_daemon_keeps_a_shadowed_mapping_as_failed(topo, daemon) -> None:
    from tests.support.control import ls

    ip_rule(topo, "add", *SHADOW)
    start, cli = daemon
    start(f'[[mapping]]\nspec = "0.0.0.0:9090:{topo.container_ip}:8080"\nsource = "client"\n')
    listing = ls(cli)
    entry = listing[f"0.0.0.0:9090:{topo.container_ip}:8080/tcp"]
    assert entry["status"] == "failed" and SHADOW_NAMED in entry["error"], entry
    assert host_state(topo)["rules"] == []


async def test_the_daemons_reconcile_finds_a_shadowing_rule_added_later(topo, daemon) -> None:
    """The check runs in the reconcile loop too: a rule added after the start is named in
    /v1/health and ``ls``, logged once, left alone (reinstalling cannot help), and the
    problem clears when the rule goes."""
    from tests.support.control import curl, wait_for

    start, cli = daemon
    proc = start(f'[[mapping]]\nspec = "0.0.0.0:9090:{topo.container_ip}:8080"\nsource = "client"\n')

    def routing_problem() -> str | None:
        status, body = curl(start.socket, path="/v1/health")
        assert status == 200, body
        return body["routing_problem"]

    assert routing_problem() is None
    ip_rule(topo, "add", *SHADOW)
    await wait_for(lambda: routing_problem() is not None, what="the reconcile loop to find the rule")
    assert SHADOW_NAMED in routing_problem()
    shown = cli("ls")
    assert shown.returncode == 0 and SHADOW_NAMED in shown.stdout, shown.stdout
    rules = topo.host.popen(["ip", "rule", "show", "pref", "100"], stdout=subprocess.PIPE, text=True).communicate()[0]
    assert "fwmark 0x1d000000/0xff000000 lookup main" in rules  # the other program's rule is left alone
    ip_rule(topo, "del", *SHADOW)
    await wait_for(lambda: routing_problem() is None, what="the problem to clear")
    proc.stop()
    assert proc.stderr.count(SHADOW_NAMED) == 1, proc.stderr  # one line per change, not per check


def _lock_path(topo) -> str:
    from portproxy.kernel.transparent import SharedRouting

    return topo.host.run(lambda: SharedRouting(TransparentOptions())._lock_path())


async def test_the_last_user_removes_the_lock_file(topo, portproxy) -> None:
    import os

    path = _lock_path(topo)
    first = portproxy("map", f"9090:{topo.container_ip}:8080", "--source", "client")
    second = portproxy("map", f"9091:{topo.container_ip}:8080", "--source", "client")
    assert os.path.exists(path)
    assert second.stop() == 0
    assert os.path.exists(path) and host_state(topo)["rules"] == [7719, 7719]  # still the first's
    assert first.stop() == 0
    assert not os.path.exists(path), first.stderr
    assert host_state(topo) == EMPTY


def _blocked_on(inode: int) -> bool:
    """Whether some flock request waits on the file with this inode (``->`` lines of /proc/locks)."""
    with open("/proc/locks") as f:
        return any("->" in line and line.split()[6].endswith(f":{inode}") for line in f)


def test_a_newcomer_waiting_on_a_removed_lock_file_takes_a_fresh_one(topo) -> None:
    """The last user holds the file exclusively, removes it and lets go; a newcomer that
    opened it just before must not share the removed file with nobody, but the new one."""
    import fcntl
    import os
    import threading

    from portproxy.kernel.transparent import SharedRouting

    path = _lock_path(topo)

    def scenario() -> tuple[bool, bool]:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        last = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(last, fcntl.LOCK_EX)  # as a last user removing the routing
        inode = os.fstat(last).st_ino
        newcomer = SharedRouting(TransparentOptions())
        thread = threading.Thread(target=newcomer.acquire)
        thread.start()
        try:
            for _ in range(500):
                if _blocked_on(inode):
                    break
                threading.Event().wait(0.01)
            waited = _blocked_on(inode)
            os.unlink(path)
            os.close(last)
            thread.join(30)
            fd = newcomer._fd
            assert fd is not None
            same = (os.stat(path).st_ino, os.stat(path).st_dev) == (os.fstat(fd).st_ino, os.fstat(fd).st_dev)
        finally:
            thread.join(30)
            newcomer.release()
        return waited, same

    assert topo.host.run(scenario) == (True, True)
    assert not os.path.exists(path) and host_state(topo) == EMPTY
