"""The client's address through `portproxy serve`: a transparent mapping shows the
container the same client address on every path, across live switches under load, and
its routing exists only while such a mapping runs; PROXY headers are refused on DNAT."""

from __future__ import annotations

import asyncio
import json

from tests.support.traffic import start_server
from tests.support.control import ls, wait_for
from tests.support.nft import nft
from tests.support.transparent import host_state, peer_reporter, seen_by_target


async def test_transparent_mapping_keeps_the_client_address_across_switches(topo, daemon) -> None:
    start, cli = daemon
    ctr = topo.container_ip
    server = await start_server(topo.container, 8080, peer_reporter)
    start(f'[[mapping]]\nspec = "0.0.0.0:9090:{ctr}:8080"\nsource = "client"\n')
    try:
        assert host_state(topo)["rules"] == [7719, 7719]
        failures: list[str] = []
        seen: set[str] = set()
        stop = asyncio.Event()

        async def clients() -> int:
            n = 0
            while not stop.is_set():
                try:
                    ip, _port, _local = await seen_by_target(topo.client, topo.host_ip, 9090)
                except (OSError, asyncio.TimeoutError, ValueError) as exc:
                    failures.append(repr(exc))
                    continue
                # The address, not the port: where the kernel path takes a connection whose
                # tuple a proxied one just used (client address and port, now in TIME_WAIT),
                # conntrack gives it another source port to keep tuples unique.
                seen.add(ip)
                n += 1
                await asyncio.sleep(0.01)
            return n

        tasks = [asyncio.create_task(clients()) for _ in range(3)]
        for mode in ("kernel", "hybrid", "userland", "kernel", "userland"):
            await asyncio.sleep(0.5)
            result = await asyncio.to_thread(cli, "switch", "9090", "--mode", mode)
            assert result.returncode == 0, result.stderr
        await asyncio.sleep(0.5)
        stop.set()
        counts = await asyncio.gather(*tasks)
        assert failures == [] and seen == {topo.client_ip} and sum(counts) > 50, (failures, seen, counts)
        # Deleted by someone: put back.
        topo.host.popen(["ip", "rule", "del", "table", "7719"]).wait(10)
        await wait_for(lambda: host_state(topo)["rules"] == [7719, 7719], 15, "the ip rule to come back")
        assert (await seen_by_target(topo.client, topo.host_ip, 9090))[0] == topo.client_ip
        assert cli("rm", "9090").returncode == 0
        state = host_state(topo)  # the last transparent mapping took its routing along
        assert (state["rules"], state["routes"], "portproxy_transparent" in state["nft"]) == ([], [], False)
    finally:
        server.close()


def test_proxy_protocol_refused_on_the_kernel_path(topo, daemon) -> None:
    start, cli = daemon
    ctr = topo.container_ip
    start()
    result = cli("add", f"9091:{ctr}:8080", "--proxy-protocol", "v2", "--mode", "kernel")
    assert result.returncode == 1 and "DNAT cannot add a header" in result.stderr
    assert cli("add", f"9091:{ctr}:8080", "--proxy-protocol", "v2").returncode == 0
    result = cli("switch", "9091", "--mode", "hybrid")
    assert result.returncode == 1 and "DNAT cannot add a header" in result.stderr
    listing = ls(cli)[f"9091:{ctr}:8080/tcp"]
    assert listing["mode"] == "userland" and listing["options"] == {"proxy_protocol": "v2"}
    assert json.loads(nft(topo, "-j", "list", "tables").stdout)["nftables"][1:] == []
