"""``PUT /v1/owners/mappings``: a CNI owner's whole set of mappings in one request, one kernel
transaction and one state write, all or nothing (a real ``portproxy serve`` in the host
namespace, real nftables); plus the pure planning it rests on."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest
from conftest import open_connection
from hypothesis import given, settings
from hypothesis import strategies as st
from test_control_plane import curl, nft, roundtrip, wait_for
from test_controller import _table_elements, ls

from portproxy.controller.config import Settings
from portproxy.controller.plan import declare as plan_owned
from portproxy.kernel.builders import KernelOptions
from portproxy.spec import SpecError, _listen_key_overlaps, check_no_overlap, parse_spec

OWNER = {"kind": "cni", "id": "1a2b3c4d5e6f7a8b9c0d", "ifname": "eth0", "network": "podman", "name": "web"}
OTHER = {"kind": "cni", "id": "ffffeeeeddddccccbbbb", "ifname": "eth0", "network": "podman"}
KERNEL = Settings("kernel")


# --- the pure decisions --------------------------------------------------------------------------

def test_plan_keeps_identical_replaces_changed_and_skips_what_dnat_cannot_serve() -> None:
    kept, gone, changed = (parse_spec(s) for s in ("0.0.0.0:9090:10.88.0.2:80", "0.0.0.0:9091:10.88.0.2:80",
                                                   "0.0.0.0:9092:10.88.0.2:80"))
    both = parse_spec("9093:10.88.0.2:80")  # no host address: IPv4 by DNAT, the IPv6 part skipped
    quicker = Settings("kernel", (("connect_timeout", 2.0),))
    plan = plan_owned({kept: KERNEL, gone: KERNEL, changed: KERNEL}, {kept: KERNEL, changed: quicker, both: KERNEL},
                      installed={kept: 1, gone: 2, changed: 3}, kernel=KernelOptions())
    assert (plan.add, plan.remove, plan.keep) == ([changed, both], [gone, changed], [kept])
    v4 = both.per_family()[0]
    assert v4.host_ip.version == 4
    assert plan.kernel_add == [v4]  # the changed mapping's DNAT, the same, stays in place
    assert plan.kernel_remove == [gone]


def test_plan_removes_only_what_is_installed_and_nothing_for_the_same_set() -> None:
    a, b = parse_spec("[::]:9090:[fd00::2]:80/udp"), parse_spec("0.0.0.0:9091:10.88.0.2:80")
    assert plan_owned({a: KERNEL, b: KERNEL}, {}, installed={a: 7}, kernel=KernelOptions()).kernel_remove == [a]
    same = plan_owned({a: KERNEL, b: KERNEL}, {b: KERNEL, a: KERNEL}, installed={a: 7, b: 8}, kernel=KernelOptions())
    assert (same.add, same.remove, same.kernel_add, same.kernel_remove) == ([], [], [], [])
    assert sorted(map(str, same.keep)) == sorted(map(str, (a, b)))


specs = st.builds(lambda host, port, width, proto: f"{host}{port}-{port + width}:10.0.0.1:{port}-{port + width}/{proto}",
                  st.sampled_from(["", "0.0.0.0:", "10.0.0.9:", "[::]:", "[fd00::9]:"]),
                  st.integers(1000, 1040), st.integers(0, 5), st.sampled_from(["tcp", "udp"]))


@settings(max_examples=300, deadline=None)
@given(st.lists(specs, max_size=12))
def test_overlap_check_finds_what_comparing_every_pair_finds(texts: list[str]) -> None:
    mappings = [parse_spec(t) for t in texts]
    pairwise = any(_listen_key_overlaps(a, b) for i, a in enumerate(mappings) for b in mappings[i + 1:])
    try:
        check_no_overlap(mappings)
        found = False
    except SpecError:
        found = True
    assert found == pairwise


# --- on a real daemon --------------------------------------------------------------------------------

def put(start, body: dict | str) -> tuple[int, dict]:
    """PUT /v1/owners/mappings with this body (from a file: bodies here may be large)."""
    path = start.socket.parent / "body.json"
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    return curl(start.socket, "-X", "PUT", "--data-binary", f"@{path}", path="/v1/owners/mappings")


def declared(ctr: str, *ports: int, **options) -> list[dict]:
    return [{"spec": f"0.0.0.0:{port}:{ctr}:8080/tcp", "mode": "kernel", **options} for port in ports]


def specs_of(ctr: str, *ports: int) -> list[str]:
    return [f"0.0.0.0:{port}:{ctr}:8080/tcp" for port in ports]


def saved_ids(start) -> dict[str, int]:
    return {m["spec"]: m["id"] for m in json.loads(start.state.read_text())["mappings"]}


async def test_declare_add_change_and_remove_a_set(topo, tcp_echo, daemon) -> None:
    start, cli = daemon
    ctr = topo.container_ip
    proc = start()
    assert put(start, {"owner": OWNER, "mappings": declared(ctr, 9090, 9091, 9092)}) == (
        200, {"added": specs_of(ctr, 9090, 9091, 9092), "removed": [], "kept": []})
    listing = ls(cli)
    assert sorted(listing) == specs_of(ctr, 9090, 9091, 9092)
    for item in listing.values():
        assert (item["owner"], item["source"], item["mode"], item["status"]) == (OWNER, "cni", "kernel", "running")
    for port in (9090, 9091, 9092):
        await roundtrip(topo, port)
    ids = saved_ids(start)
    connections = ls(cli)[specs_of(ctr, 9090)[0]]["kernel"]["connections"]
    assert connections == 1

    renamed = {**OWNER, "name": "web-2"}  # a display field: the same owner
    assert put(start, {"owner": renamed, "mappings": declared(ctr, 9091, 9090, 9093)}) == (
        200, {"added": specs_of(ctr, 9093), "removed": specs_of(ctr, 9092), "kept": specs_of(ctr, 9091, 9090)})
    listing = ls(cli)
    assert sorted(listing) == specs_of(ctr, 9090, 9091, 9093)
    assert {item["owner"]["name"] for item in listing.values()} == {"web-2"}
    assert listing[specs_of(ctr, 9090)[0]]["kernel"]["connections"] == connections  # untouched
    after = saved_ids(start)
    assert {spec: after[spec] for spec in specs_of(ctr, 9090, 9091)} == {
        spec: ids[spec] for spec in specs_of(ctr, 9090, 9091)}
    await roundtrip(topo, 9093)
    with pytest.raises(ConnectionRefusedError):
        await open_connection(topo.client, topo.host_ip, 9092)

    assert put(start, {"owner": renamed, "mappings": []}) == (
        200, {"added": [], "removed": specs_of(ctr, 9090, 9091, 9093), "kept": []})
    assert ls(cli) == {}
    assert _table_elements(topo)["id4_any"] == []
    assert put(start, {"owner": renamed, "mappings": []}) == (200, {"added": [], "removed": [], "kept": []})
    assert json.loads(start.state.read_text())["mappings"] == []
    lines = [line for line in proc.stderr_lines if "owner cni 1a2b3c4d5e6f" in line]
    assert [line.split("owner cni 1a2b3c4d5e6f: ")[1].strip() for line in lines] == [
        "+3 -0 (=0)", "+1 -1 (=2)", "+0 -3 (=0)", "+0 -0 (=0)"]
    assert "Traceback" not in proc.stderr


async def test_a_refused_set_changes_nothing(topo, tcp_echo, daemon) -> None:
    start, cli = daemon
    ctr = topo.container_ip
    start()
    assert put(start, {"owner": OWNER, "mappings": declared(ctr, 9090, 9091)})[0] == 200
    assert put(start, {"owner": OTHER, "mappings": declared(ctr, 9095)})[0] == 200
    assert cli("add", f"9096:{ctr}:8080", "--mode", "kernel").returncode == 0
    listing, elements, state = ls(cli), _table_elements(topo), start.state.read_text()

    def unchanged() -> None:
        assert ls(cli) == listing
        assert _table_elements(topo) == elements
        assert start.state.read_text() == state

    for port in (9095, 9096):  # the third mapping overlaps another owner's, or the API's
        status, body = put(start, {"owner": OWNER, "mappings": declared(ctr, 9090, 9092, port)})
        assert status == 409 and "overlap" in body["error"] and str(port) in body["error"], body
        unchanged()
    status, body = put(start, {"owner": OWNER, "mappings": [
        *declared(ctr, 9092), {"spec": f"0.0.0.0:9093:{ctr}:8080", "mode": "userland"}]})
    assert status == 400 and "mode userland" in body["error"] and "POST" in body["error"], body
    bad = [
        ({"owner": OWNER, "mappings": [{"spec": f"9092:{ctr}:8080", "mod": "kernel"}]}, "did you mean 'mode'"),
        ({"owner": OWNER, "mappings": [{"spec": f"9092:{ctr}:8080", "mode": "kernel", "udp_timeout": 0}]},
         "udp_timeout"),
        ({"owner": OWNER, "mappings": [{"spec": f"9092:{ctr}:8080"}]}, "mode userland"),
        ({"owner": OWNER, "mappings": declared(ctr, 9092, 9092)}, "overlap"),
        ({"owner": OWNER, "mappings": [{"spec": "9092:1.2.3", "mode": "kernel"}]}, "mapping #1"),
        ({"owner": OWNER, "mappings": [{**m, "owner": OWNER} for m in declared(ctr, 9092)]}, "owner"),
        ({"owner": {**OWNER, "kind": "docker"}, "mappings": []}, "kind cni"),
        ({"owner": "me", "mappings": []}, "owner"),
        ({"mappings": []}, "owner"),
        ({"owner": OWNER}, "'mappings'"),
        ({"owner": OWNER, "mappings": {}}, "'mappings'"),
        ({"owner": OWNER, "mappings": [], "extra": 1}, "unknown field(s) 'extra'"),
        ("[1, 2]", "JSON object"),
    ]
    for body, message in bad:
        status, answer = put(start, body)
        assert status == 400 and message in answer["error"], (body, answer)
        assert len(answer["error"]) < 400 and "\n" not in answer["error"]
    unchanged()
    status, answer = put(start, json.dumps({"owner": OWNER, "mappings": declared(ctr, 9092)}) + " " * (16 << 20))
    assert status == 413 and "error" in answer
    unchanged()
    for port in (9090, 9091, 9095, 9096):
        await roundtrip(topo, port)


class Monitor:
    """``nft monitor`` in the host namespace, its lines collected by a thread."""

    def __init__(self, topo) -> None:
        self.topo = topo
        self.proc = topo.host.popen(["nft", "monitor"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.thread.start()

    def mark(self, name: str) -> int:
        """Make and delete a table ``name`` until the monitor reports it (it subscribes at some
        moment after it starts); the index of the line after that table's own transaction."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            nft(self.topo, "add", "table", "inet", name)
            nft(self.topo, "delete", "table", "inet", name)
            for _ in range(20):
                lines = list(self.lines)
                seen = [i for i, line in enumerate(lines) if f"delete table inet {name}" in line][-1:]
                done = [i for i, line in enumerate(lines) if seen and i > seen[0] and line.startswith("# new generation")]
                if done:
                    return done[0] + 1
                time.sleep(0.05)
        raise AssertionError("nft monitor reported nothing")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.thread.join(timeout=5)


async def test_a_set_of_200_scattered_ports_is_one_kernel_transaction(topo, tcp_echo, daemon) -> None:
    start, cli = daemon
    ctr = topo.container_ip
    proc = start()
    ports = [20000 + 2 * i for i in range(200)]
    assert put(start, {"owner": OWNER, "mappings": declared(ctr, 9090)})[0] == 200
    monitor = Monitor(topo)
    try:
        first = monitor.mark("batch_before")
        status, body = put(start, {"owner": OWNER, "mappings": declared(ctr, *ports)})
        assert status == 200 and len(body["added"]) == 200 and body["removed"] == specs_of(ctr, 9090)
        last = monitor.mark("batch_after")
        between = monitor.lines[first:last]
        transactions = [line for line in between if line.startswith("# new generation") and "(nft)" not in line]
        assert len(transactions) == 1, between  # the daemon's; the markers' are the nft command's
        assert sum(line.startswith("add element") for line in between) >= 200
    finally:
        monitor.stop()
    assert len(ls(cli)) == 200 and len(_table_elements(topo)["id4_any"]) == 200
    for port in (ports[0], ports[137], ports[-1]):
        await roundtrip(topo, port)
    assert "Traceback" not in proc.stderr


async def test_a_declared_set_survives_a_restart(topo, tcp_echo, daemon) -> None:
    start, cli = daemon
    ctr = topo.container_ip
    proc = start()
    assert put(start, {"owner": OWNER, "mappings": declared(ctr, 9090, 9091, 9092)})[0] == 200
    before, ids = ls(cli), saved_ids(start)
    proc.stop()
    start()
    after = ls(cli)
    assert sorted(after) == sorted(before)
    assert {spec: (m["owner"], m["source"], m["mode"]) for spec, m in after.items()} == {
        spec: (OWNER, "cni", "kernel") for spec in specs_of(ctr, 9090, 9091, 9092)}
    assert saved_ids(start) == ids
    await wait_for(lambda: all(m["status"] == "running" for m in ls(cli).values()), 15, "the mappings to run")
    for port in (9090, 9091, 9092):
        await roundtrip(topo, port)
    assert put(start, {"owner": OWNER, "mappings": declared(ctr, 9090, 9091, 9092)}) == (
        200, {"added": [], "removed": [], "kept": specs_of(ctr, 9090, 9091, 9092)})
