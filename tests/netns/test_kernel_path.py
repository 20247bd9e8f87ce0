"""The kernel path with real nftables rules in the test's own host namespace, and real traffic."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from tests.support.traffic import echo_roundtrip, open_connection, start_server, start_udp_echo, udp_endpoint
from portproxy.kernel.builders import KernelOptions
from portproxy.kernel.executor import NftError
from portproxy.kernel.path import KernelPath
from portproxy.kernel import builders
from portproxy.spec import parse_spec
from tests.support.namespaces import add_container, read_sysctl
from tests.support.nft import nft_json, tables


def counters(ns) -> dict:
    """Counters by mapping id, read from the table another process installed."""
    from portproxy.kernel.executor import Nft
    from portproxy.kernel.path import read_counters

    return ns.run(lambda: read_counters(Nft(), KernelOptions()))


async def test_client_through_dnat_tcp_and_udp(topo, tcp_echo, udp_echo, portproxy) -> None:
    proxy = portproxy("map", "--mode", "kernel", f"9090:{topo.container_ip}:8080",
                      f"5353:{topo.container_ip}:5353/udp", ready=4)
    assert proxy.ready[0::2] == [f"ready tcp 0.0.0.0:9090 -> {topo.container_ip}:8080 (kernel)",
                                 f"ready udp 0.0.0.0:5353 -> {topo.container_ip}:5353 (kernel)"]
    payload = os.urandom(8 << 20)
    received = await echo_roundtrip(topo.client, topo.host_ip, 9090, payload)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    client = await udp_endpoint(topo.client)
    for i in range(5):
        client.transport.sendto(b"dgram %d" % i, (topo.host_ip, 5353))
        data, source = await client.recv()
        assert data == b"dgram %d" % i and source == (topo.host_ip, 5353)
    # DNAT keeps the client's address (unlike a proxy): the target sees 198.51.100.2.
    client.transport.sendto(b"whoami", (topo.host_ip, 5353))
    data, _ = await client.recv()
    assert data.decode().split()[0] == topo.client_ip


async def test_ipv6_and_port_range(topo, tcp_echo, portproxy) -> None:
    servers = []
    for port in (8100, 8101):
        async def tag(reader, writer, port=port):
            writer.write(str(port).encode())
            await writer.drain()
            writer.close()
        servers.append(await start_server(topo.container, port, tag))
    portproxy("map", "--mode", "kernel", f"9090:[{topo.container_ip6}]:8080", f"9100-9101:{topo.container_ip}:8100-8101",
              ready=3)
    assert await echo_roundtrip(topo.client, topo.host_ip6, 9090, b"v6 bytes") == b"v6 bytes"
    for offset in (0, 1):
        reader, writer = await open_connection(topo.client, topo.host_ip, 9100 + offset)
        assert await asyncio.wait_for(reader.read(-1), 5) == str(8100 + offset).encode()
        writer.close()
    for server in servers:
        server.close()


async def test_hairpin_container_reaches_its_own_published_port(topo, tcp_echo, portproxy) -> None:
    proxy = portproxy("map", "--mode", "kernel", f"9090:{topo.container_ip}:8080")
    assert await echo_roundtrip(topo.container, topo.host_ip, 9090, b"hairpin") == b"hairpin"
    proxy.stop()
    assert "hairpin mode enabled on br0 port(s) vc0" in proxy.stderr


async def test_host_itself_reaches_published_port(topo, tcp_echo, portproxy) -> None:
    portproxy("map", "--mode", "kernel", f"9090:{topo.container_ip}:8080")
    for address in (topo.host_ip, topo.bridge_ip):
        assert await echo_roundtrip(topo.host, address, 9090, b"from the host") == b"from the host"
    # Loopback is not published without route_localnet.
    with pytest.raises(ConnectionRefusedError):
        await open_connection(topo.host, "127.0.0.1", 9090)


async def test_route_localnet_publishes_loopback(topo, tcp_echo, portproxy) -> None:
    proc = portproxy("map", "--mode", "kernel", "--route-localnet", f"9090:{topo.container_ip}:8080", ready=None)
    assert proc.proc.wait(timeout=20) == 1
    assert "net.ipv4.conf.all.route_localnet=1" in proc.stderr
    portproxy("map", "--mode", "kernel", "--route-localnet", "--set-sysctls", f"9090:{topo.container_ip}:8080")
    assert await echo_roundtrip(topo.host, "127.0.0.1", 9090, b"via loopback") == b"via loopback"


async def test_container_egress_is_masqueraded(topo, portproxy) -> None:
    seen: list[str] = []

    async def record_peer(reader, writer):
        seen.append(writer.get_extra_info("peername")[0])
        writer.close()

    outside = await start_server(topo.client, 7000, record_peer)
    portproxy("map", "--mode", "kernel", "--masquerade", "172.16.0.0/16,br0", f"9090:{topo.container_ip}:8080")
    reader, writer = await open_connection(topo.container, topo.client_ip, 7000)
    await reader.read()
    writer.close()
    outside.close()
    assert seen == [topo.host_ip]


async def test_counters_grow_with_traffic(topo, tcp_echo, portproxy) -> None:
    portproxy("map", "--mode", "kernel", f"9090:{topo.container_ip}:8080")
    before = counters(topo.host)[1]
    assert (before.connections, before.packets, before.bytes) == (0, 0, 0)
    payload = os.urandom(1_000_000)
    for _ in range(3):
        assert await echo_roundtrip(topo.client, topo.host_ip, 9090, payload) == payload
    after = counters(topo.host)[1]
    assert after.connections == 3
    # Each direction carried the payload, plus headers.
    assert after.bytes_to_target >= 3 * len(payload) and after.bytes_to_client >= 3 * len(payload)
    assert after.packets > 2 * 3 * len(payload) // 65536


async def test_table_removed_on_exit_and_other_tables_untouched(topo, tcp_echo, portproxy) -> None:
    def make_other_table() -> None:
        import nftables

        ctx = nftables.Nftables()
        rc, _, err = ctx.cmd("add table ip bystander; add chain ip bystander c { type filter hook forward priority 0; }")
        assert rc == 0, err

    topo.host.run(make_other_table)
    other_before = nft_json(topo.host, "list table ip bystander")
    proxy = portproxy("map", "--mode", "kernel", f"9090:{topo.container_ip}:8080")
    assert ("inet", "portproxy") in tables(topo.host)
    assert proxy.stop() == 0
    assert tables(topo.host) == [("ip", "bystander")]
    assert nft_json(topo.host, "list table ip bystander") == other_before


def test_reapplying_gives_no_duplicates(topo) -> None:
    mappings = [parse_spec(f"{9000 + i}:{topo.container_ip}:8080") for i in range(5)]

    def install_twice() -> tuple[str, str]:
        import nftables

        path = KernelPath(KernelOptions())
        path.apply(mappings, replace=True)
        once = nftables.Nftables().cmd("list ruleset")[1]
        path.apply(mappings, replace=True)
        twice = nftables.Nftables().cmd("list ruleset")[1]
        path.teardown()
        return once, twice

    once, twice = topo.host.run(install_twice)
    assert once == twice
    assert once.count("tcp . 90") == 3 * 5  # id, address and port elements of each mapping


def test_failed_batch_changes_nothing(topo) -> None:
    """libnftables batches are atomic: a batch that fails half-way leaves the old table intact."""

    def attempt() -> tuple[str, str, str]:
        import nftables

        path = KernelPath(KernelOptions())
        path.apply([parse_spec(f"9090:{topo.container_ip}:8080")], replace=True)
        before = nftables.Nftables().cmd("list ruleset")[1]
        bad = builders.add_mappings([(parse_spec(f"9091:{topo.container_ip}:8080"), 2)], path.opts)
        assert bad[0]["add"]["element"]["name"] == "id4_any"
        bad.append({"add": {"element": {"family": "inet", "table": "portproxy", "name": "no-such-map",
                                        "elem": [1]}}})
        try:
            path._nft.apply(bad)
            message = ""
        except NftError as exc:
            message = str(exc)
        after = nftables.Nftables().cmd("list ruleset")[1]
        path.teardown()
        return before, after, message

    before, after, message = topo.host.run(attempt)
    assert message.startswith("nftables refused the change:") and "\n" not in message
    assert before == after


async def test_stale_udp_flow_moves_when_mapping_changes(topo, portproxy) -> None:
    """A UDP flow that already has a conntrack entry follows the mapping when it is added and changed."""
    second = add_container(topo, "pt-ctr2", "172.16.1.2", "fd00:172:16::2", "vc1")
    first_echo = await start_udp_echo(topo.container, 5353)

    class Tagger(asyncio.DatagramProtocol):
        """The second target answers with a tag, so the test can tell where a datagram went."""

        def connection_made(self, transport):
            self.transport = transport

        def datagram_received(self, data, addr):
            self.transport.sendto(b"second:" + data, addr)

    sock = second.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 5353))
    sock.setblocking(False)
    second_echo, _ = await asyncio.get_running_loop().create_datagram_endpoint(Tagger, sock=sock)
    client = await udp_endpoint(topo.client)
    # 1. No mapping yet: the datagrams create a conntrack entry without NAT.
    for _ in range(3):
        client.transport.sendto(b"early", (topo.host_ip, 5353))
        await asyncio.sleep(0.05)
    # 2. Map to the first container: the stale entry is deleted, the same flow is translated.
    first = portproxy("map", "--mode", "kernel", f"5353:{topo.container_ip}:5353/udp")
    client.transport.sendto(b"one", (topo.host_ip, 5353))
    assert (await client.recv())[0] == b"one"
    first.stop()
    # 3. Re-map to the second container: the same client flow now reaches it.
    portproxy("map", "--mode", "kernel", "5353:172.16.1.2:5353/udp")
    client.transport.sendto(b"two", (topo.host_ip, 5353))
    assert (await client.recv())[0] == b"second:two"
    for t in (first_echo, second_echo):
        t.close()


async def test_udp_flow_begun_by_the_host_side_moves_to_the_dnat(topo, udp_echo, portproxy) -> None:
    """An entry that runs from the host port to the client (the host's side spoke first, as
    when conntrack starts tracking a proxied flow mid-way) matches the client's datagrams as
    replies, which are never translated: it must be deleted for the flow to reach the DNAT."""
    from portproxy.kernel import conntrack

    first = portproxy("map", "--mode", "kernel", f"9998:{topo.container_ip}:9998/udp")  # turns conntrack on
    client = await udp_endpoint(topo.client)
    client_port = client.transport.get_extra_info("sockname")[1]
    host_side = await udp_endpoint(topo.host, topo.host_ip, 5354)  # as a proxy listener would
    host_side.transport.sendto(b"hello from the host", (topo.client_ip, client_port))
    assert (await client.recv())[0] == b"hello from the host"
    client.transport.sendto(b"ping", (topo.host_ip, 5354))
    assert await host_side.recv() == (b"ping", (topo.client_ip, client_port))  # not translated
    host_side.transport.close()  # the port is now published on the kernel path, which holds it
    await asyncio.sleep(0.1)  # (a transport closes on the next turn of the loop)
    first.stop()
    portproxy("map", "--mode", "kernel", f"5354:{topo.container_ip}:5353/udp")
    assert await asyncio.to_thread(topo.host.run, conntrack.delete_udp_flows, [(5354, 5354)], True,
                                   [topo.container_ip]) == 0  # the start deleted it already
    client.transport.sendto(b"ping", (topo.host_ip, 5354))
    assert (await client.recv())[0] == b"ping"  # the container's echo, through the DNAT


async def test_udp_entries_still_on_the_old_path_are_deleted_until_none_is_left(topo, portproxy, caplog) -> None:
    """After the first pass, a re-created entry that bypasses the DNAT is deleted again;
    the proxy's own untranslated flows to the target are left alone."""
    from portproxy.kernel import conntrack

    portproxy("map", "--mode", "kernel", f"9999:{topo.container_ip}:9999/udp")  # turns conntrack on

    # A process of its own, sending every millisecond: a sender sharing this process's loop
    # (and GIL) with the deleting thread could miss a whole verification interval under load.
    sender = ("import socket, sys, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
              "print(flush=True)\nwhile True:\n    s.sendto(b'x', (sys.argv[1], 5353))\n    time.sleep(0.001)\n")

    async def passes_deleting_again(ns, destination: str) -> int:
        """How many verification passes found a re-created stale entry (and deleted it)."""
        proc = ns.popen([sys.executable, "-c", sender, destination], stdout=subprocess.PIPE)
        caplog.clear()
        try:
            assert proc.stdout is not None and proc.stdout.readline() == b"\n"
            await asyncio.sleep(0.1)
            with caplog.at_level(logging.INFO, logger="portproxy"):
                deleted = await asyncio.to_thread(topo.host.run, conntrack.delete_udp_flows, [(5353, 5353)], True,
                                                  [topo.container_ip])
            assert deleted >= 1  # the first pass takes every entry of the port
        finally:
            proc.kill()
            proc.wait()
        return sum("still took the old path" in r.getMessage() for r in caplog.records)

    # A client's flow that no DNAT translates (as if one was missed): deleted pass after pass.
    assert await passes_deleting_again(topo.client, topo.host_ip) >= 1
    # The host's own flow to the target (what the proxy's upstream looks like): left alone after.
    assert await passes_deleting_again(topo.host, topo.container_ip) == 0


def _run_cli(ns, *args: str, preexec_argv: list[str] | None = None) -> subprocess.CompletedProcess:
    argv = (preexec_argv or []) + [sys.executable, "-m", "portproxy", *args]
    proc = ns.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=30)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def test_without_cap_net_admin_one_line_and_nothing_installed(topo) -> None:
    drop = ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin", "--"]
    result = _run_cli(topo.host, "map", "--mode", "kernel", f"9090:{topo.container_ip}:8080", preexec_argv=drop)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "CAP_NET_ADMIN" in lines[0], result.stderr
    assert tables(topo.host) == []


def test_missing_ip_forward_is_named_not_changed(topo) -> None:
    topo.host.sysctl("net/ipv4/ip_forward", "0")
    result = _run_cli(topo.host, "map", "--mode", "kernel", f"9090:{topo.container_ip}:8080")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "portproxy: the kernel path needs net.ipv4.ip_forward=1; set it, or pass --set-sysctls to let portproxy set it"
    )
    assert read_sysctl(topo.host, "net/ipv4/ip_forward") == "0"
    assert tables(topo.host) == []


async def test_a_family_the_kernel_cannot_translate_is_proxied(topo, tcp_echo, portproxy) -> None:
    """No NAT64: an IPv6 client of an IPv4 target is served by the proxy, and says so."""
    proc = portproxy("map", "--mode", "kernel", f"9090:{topo.container_ip}:8080", ready=2)
    assert proc.ready == [f"ready tcp 0.0.0.0:9090 -> {topo.container_ip}:8080 (kernel)",
                          f"ready tcp [::]:9090 -> {topo.container_ip}:8080 "
                          "(userland: DNAT cannot translate IPv6 to IPv4)"]
    for host in (topo.host_ip, topo.host_ip6):
        reader, writer = await open_connection(topo.client, host, 9090)
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        writer.close()


async def test_kernel_map_of_more_ports_than_fd_setsize(topo, portproxy) -> None:
    """1,100 published ports each hold a socket, so the process's descriptors pass 1,024
    before it opens an nft context: libnftables' select() must still get a low one."""
    first, count = 20000, 1100
    servers = []
    for port in (first, first + count - 1):
        async def tag(reader, writer, port=port):
            writer.write(str(port).encode())
            await writer.drain()
            writer.close()
        servers.append(await start_server(topo.container, port, tag))
    try:
        proxy = portproxy("map", "--mode", "kernel", f"0.0.0.0:{first}-{first + count - 1}:{topo.container_ip}:"
                          f"{first}-{first + count - 1}", ready=count)
        for port in (first, first + count - 1):
            reader, writer = await open_connection(topo.client, topo.host_ip, port)
            assert await asyncio.wait_for(reader.read(-1), 10) == str(port).encode()
            writer.close()
        assert proxy.stop() == 0, proxy.stderr
    finally:
        for server in servers:
            server.close()


NO_LOW_DESCRIPTOR = """
import resource, socket
from portproxy.kernel.executor import LOW, Nft, NftUnavailable
resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
held = [socket.socket() for _ in range(1100)]  # no reserve taken: nothing below 1024 is free
try:
    Nft()
except NftUnavailable as exc:
    print(exc)
"""


def test_no_low_descriptor_left_is_one_line_not_an_abort(topo) -> None:
    """When nothing can give libnftables a descriptor below 1024, creating a context is
    refused in words; the process lives on."""
    proc = topo.host.popen([sys.executable, "-c", NO_LOW_DESCRIPTOR], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "select() cannot wait on one past 1023" in out, out


async def test_daemon_with_more_kernel_ports_than_fd_setsize(topo, tcp_echo, daemon) -> None:
    """The same through ``portproxy serve``: the nft contexts it opens after 1,100 ports
    are held (transparent mode's, each time its routing is checked or installed) work."""
    import urllib.request

    start, cli = daemon
    first, last = 20000, 21099
    proc = start(f'[[mapping]]\nspec = "0.0.0.0:{first}-{last}:{topo.container_ip}:{first}-{last}"\n'
                 'mode = "kernel"\n', "--metrics-addr", "127.0.0.1:9779")
    result = cli("add", f"0.0.0.0:9090:{topo.container_ip}:8080", "--mode", "kernel")
    assert result.returncode == 0, result.stderr + proc.stderr
    result = cli("add", f"0.0.0.0:9091:{topo.container_ip}:8080", "--source", "client")
    assert result.returncode == 0, result.stderr + proc.stderr
    metrics = topo.host.run(lambda: urllib.request.urlopen("http://127.0.0.1:9779/metrics", timeout=30).read())
    assert b"portproxy_" in metrics
    listing = json.loads(cli("ls", "--json").stdout)["mappings"]
    assert [m["status"] for m in listing] == ["running"] * 3, listing
    for port in (9090, 9091):
        assert await echo_roundtrip(topo.client, topo.host_ip, port, b"past 1024") == b"past 1024"
    assert proc.proc.poll() is None, proc.stderr
