"""The bench's report logic, without root: a measurement that did not happen is reported as
failed ("failed: <why>", "not measured"), never as a number, never as a target met."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portproxy.bench import checks, report, tools
from portproxy.bench.checks import Unmeasured
from portproxy.bench.paths import DIRECT, DOCKER_PROXY, KERNEL, SPLICE
from portproxy.bench.workloads import WORKLOADS

LABELS = {DIRECT: "direct routing (no NAT)", KERNEL: "portproxy kernel (nftables DNAT)",
          SPLICE: "portproxy userland, splice (uvloop)", DOCKER_PROXY: "docker-proxy (Debian docker.io)"}


def results(**workloads: dict[str, Any]) -> dict[str, Any]:
    """A run's record with the given workload records and nothing else measured."""
    return {
        "time": "2026-12-08 00:00:00",
        "machine": {"cpu": "test", "cpus": 2, "memory_gib": 1.0, "os": "test", "kernel": "6", "python": "3.11",
                    "tcp_cc": "cubic"},
        "settings": {"seconds": 1, "rounds": 1, "wrk_connections": 64, "quick": True},
        "paths": dict(LABELS),
        "workloads": {w.key: {"label": w.label, "runs": {}, "errors": {}, **workloads.get(w.key, {})}
                      for w in WORKLOADS},
        "memory": {},
    }


def target(record: dict[str, Any], starts: str) -> dict[str, Any]:
    summary = report.summaries(record)
    found = [t for t in report.targets(record, summary) if t["target"].startswith(starts)]
    assert len(found) == 1, [t["target"] for t in report.targets(record, summary)]
    return found[0]


def targets_table(markdown: str) -> list[str]:
    section = markdown.split("## Targets", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| target")]


# --- the failed idle-connection measurement ------------------------------------------------------
def test_a_failed_idle_connection_measurement_is_not_measured_never_met() -> None:
    record = results()
    why = "userland-splice: the relay holds 0 new sockets for 8000 connections (at least 16000 expected)"
    record["memory"] = {"idle": {"count": 8000, "results": {SPLICE: {"error": why}}}}
    t = target(record, "memory per idle connection")
    assert t["met"] is None and t["value"] is None and t["shown"] == "not measured"
    assert "0 new sockets" in t["why"]
    md = report.markdown(record, None)
    row = next(line for line in targets_table(md) if line.startswith("| memory per idle connection"))
    assert "not measured" in row and "| met |" not in row and "0.00" not in row
    table = md.split("## Memory per idle connection", 1)[1]
    assert f"| {LABELS[SPLICE]} | failed: {why}" in table
    assert "0.00" not in table


def test_no_sockets_held_by_the_relay_is_unmeasured() -> None:
    with pytest.raises(Unmeasured, match="did not pass through it"):
        checks.held_through_relay("docker-proxy", new_sockets=0, connections=8000)
    with pytest.raises(Unmeasured, match="did not pass through it"):
        checks.held_through_relay("haproxy", new_sockets=7999, connections=4000)
    with pytest.raises(Unmeasured):
        checks.held_through_relay("socat", new_sockets=0, connections=0)
    checks.held_through_relay("userland-splice", new_sockets=16000, connections=8000)


def test_rss_per_connection_refuses_what_did_not_happen() -> None:
    assert checks.rss_per_connection_kib(1000, 9000, 8000) == 1.0
    for before, after, count in ((0, 0, 8000), (1000, 0, 8000), (1000, 2000, 0), (2000, 1000, 8000)):
        with pytest.raises(Unmeasured):
            checks.rss_per_connection_kib(before, after, count)


# --- workloads that did not run ------------------------------------------------------------------
def test_a_path_whose_every_round_failed_shows_failed_cells_not_numbers() -> None:
    record = results(**{"tcp-1": {"runs": {SPLICE: [{"gbit_per_s": 7.5, "cpu_s_per_gb": 0.5}]},
                                  "errors": {DOCKER_PROXY: ["iperf3's server received no byte"]}}})
    md = report.markdown(record, None)
    table = md.split("## TCP throughput, 1 stream (iperf3)", 1)[1].split("\n## ", 1)[0]
    row = next(line for line in table.splitlines() if line.startswith(f"| {LABELS[DOCKER_PROXY]}"))
    assert "failed: iperf3's server received no byte" in row
    assert not re.search(r"\d", row.split("failed:", 1)[0])  # no figure before the reason
    t = target(record, "userland single-stream throughput vs docker-proxy")
    assert t["met"] is None and "failed" in t["why"]


def test_some_rounds_failed_says_how_many() -> None:
    record = results(**{"tcp-1": {"runs": {SPLICE: [{"gbit_per_s": 7.5}, {"gbit_per_s": 8.5}]},
                                  "errors": {SPLICE: ["iperf3 did not finish within 61 s"]}}})
    md = report.markdown(record, None)
    assert "1 of 3 rounds failed: iperf3 did not finish within 61 s" in md


def test_old_records_with_one_error_string_still_render() -> None:
    record = results(**{"tcp-rr": {"errors": {SPLICE: "sockperf failed: 1"}}})
    assert "failed: sockperf failed: 1" in report.markdown(record, None)


def test_a_missing_peer_is_not_measured_and_a_zero_base_is_no_ratio() -> None:
    record = results(**{"conn-rate": {"runs": {SPLICE: [{"connections_per_s": 9000.0, "errors": 0.0,
                                                          "cpu_us_per_connection": 100.0}],
                                               DOCKER_PROXY: [{"connections_per_s": 0.0, "errors": 0.0,
                                                               "cpu_us_per_connection": 0.0}]}}})
    del record["paths"][DOCKER_PROXY]
    assert target(record, "userland connection rate vs docker-proxy")["met"] is None
    record["paths"][DOCKER_PROXY] = LABELS[DOCKER_PROXY]
    for name in ("userland connection rate vs docker-proxy", "userland relay CPU per connection"):
        t = target(record, name)
        assert t["met"] is None and "zero" in t["why"]


# --- CPU per unit of work ------------------------------------------------------------------------
def test_cpu_per_unit_targets_compare_with_docker_proxy() -> None:
    def rr(relay: float) -> dict[str, float]:
        return {"connections_per_s": 8000.0, "errors": 0.0, "connections": 8000.0, "cpu_us_per_connection": relay,
                "machine_cpu_us_per_connection": relay * 3}

    def udp(relay: float) -> dict[str, float]:
        return {"delivered_datagrams_per_s": 50000.0, "loss_percent": 1.0, "cpu_us_per_datagram": relay,
                "machine_cpu_us_per_datagram": relay * 2}

    record = results(**{
        "conn-rate": {"runs": {SPLICE: [rr(60.0), rr(70.0), rr(50.0)], DOCKER_PROXY: [rr(130.0), rr(140.0)]}},
        "udp-1g": {"runs": {SPLICE: [udp(7.3)], DOCKER_PROXY: [udp(12.2)]}},
    })
    per_conn = target(record, "userland relay CPU per connection")
    assert per_conn["met"] is True and per_conn["value"] == pytest.approx(60 / 135)
    per_datagram = target(record, "userland relay CPU per UDP datagram")
    assert per_datagram["met"] is False and per_datagram["shown"] == "0.60×"
    md = report.markdown(record, None)
    table = md.split("## Connection rate", 1)[1].split("\n## ", 1)[0]
    assert "relay CPU (CPU-µs/conn)" in table and "machine CPU (CPU-µs/conn)" in table
    cells = "| 8,000 (8,000–8,000) | 0.00 (0.00–0.00) | 60.0 (50.0–70.0) | 180 (150–210) |"
    assert f"| {LABELS[SPLICE]} {cells}" in table
    assert "Machine CPU: the whole machine's busy time" in table


def test_relay_cpu_of_nothing_is_unmeasured() -> None:
    assert checks.relay_cpu_per_unit(0.5, 5000, "connections", 1e6) == pytest.approx(100.0)
    with pytest.raises(Unmeasured, match="did not pass through them"):
        checks.relay_cpu_per_unit(0.0, 5000, "connections", 1e6)
    with pytest.raises(Unmeasured):
        checks.relay_cpu_per_unit(0.5, 0, "connections", 1e6)
    with pytest.raises(Unmeasured):
        checks.per_unit(-0.01, 10, "GB")


# --- the tools' output: nothing done is no measurement ------------------------------------------
def test_iperf_results_that_moved_nothing_are_unmeasured() -> None:
    with pytest.raises(Unmeasured):
        tools.tcp_stream({"end": {"sum_received": {"bytes": 0, "bits_per_second": 0.0}}})
    with pytest.raises(Unmeasured):
        tools.tcp_stream({"end": {}})
    with pytest.raises(Unmeasured, match="sent no datagram"):
        tools.udp_stream({"end": {"sum": {"packets": 0, "lost_packets": 0, "seconds": 1.0}}})
    with pytest.raises(Unmeasured, match="no datagram reached the server"):
        tools.udp_stream({"end": {"sum": {"packets": 1000, "lost_packets": 1000, "seconds": 1.0}}})
    ok = tools.udp_stream({"end": {"sum": {"packets": 1000, "lost_packets": 100, "seconds": 2.0,
                                           "bits_per_second": 5e6}}})
    assert ok["delivered_datagrams"] == 900 and ok["delivered_datagrams_per_s"] == 450 and ok["loss_percent"] == 10


WRK_OK = """Running 1s test @ http://198.51.100.1:20303/
  1 threads and 64 connections
  7990 requests in 1.00s, 1.05MB read
  Socket errors: connect 0, read 3, write 0, timeout 0
Requests/sec:   7985.12
Transfer/sec:      1.05MB
"""


def test_wrk_output() -> None:
    assert tools.parse_wrk(WRK_OK) == {"connections_per_s": 7985.12, "errors": 3.0, "connections": 7990.0}
    nothing = WRK_OK.replace("7990 requests", "0 requests").replace("7985.12", "0.00")
    with pytest.raises(Unmeasured, match="no request"):
        tools.parse_wrk(nothing)
    with pytest.raises(tools.ToolError):
        tools.parse_wrk("unable to connect")


def test_sockperf_output() -> None:
    out = ("sockperf: Total 35974 observations; each percentile contains 359.74 observations\n"
           "sockperf: ---> percentile 99.000 =   65.201\nsockperf: ---> percentile 50.000 =   11.230\n")
    assert tools.parse_sockperf(out, tcp=False) == {"p50_us": 11.23, "p99_us": 65.201, "round_trips": 35974.0}
    with pytest.raises(Unmeasured, match="no round trip"):
        tools.parse_sockperf("sockperf: No messages were received from the server. Is the server down?", tcp=True)


# --- whatever failed, no target is met without a figure ----------------------------------------------
FAILURE = st.sampled_from(["no datagram reached the server (10 sent)", "iperf3 did not finish within 61 s"])
VALUE = st.floats(min_value=0, max_value=1e5, allow_nan=False)


@st.composite
def runs_or_failures(draw: st.DrawFn) -> dict[str, Any]:
    """A random run record: per workload and path, measured rounds, failed rounds, or nothing."""
    record = results()
    for workload in WORKLOADS:
        for path in LABELS:
            kind = draw(st.sampled_from(["runs", "errors", "both", "none"]))
            if kind in ("runs", "both"):
                record["workloads"][workload.key]["runs"][path] = [
                    {m.key: draw(VALUE) for m in workload.metrics if draw(st.booleans())}
                    for _ in range(draw(st.integers(1, 3)))]
            if kind in ("errors", "both"):
                record["workloads"][workload.key]["errors"][path] = [draw(FAILURE)]
    for part, key in (("mappings", "rss_mib"), ("idle", "kib_per_connection"), ("slow_readers", "total_mib")):
        entries = {}
        for path in (SPLICE, DIRECT):
            if draw(st.booleans()):
                entries[path] = {"error": draw(FAILURE)} if draw(st.booleans()) else {
                    key: draw(VALUE), "sampled": 1.0, "processes": 1.0, "connections": 10.0, "rss_before_mib": 1.0,
                    "rss_after_mib": 2.0, "kib_per_client": 1.0, "client_mib": 0.0, "host_mib": 0.0,
                    "container_mib": 0.0, "pipes_mib": 0.0}
        record["memory"][part] = {"count": 10, "results": entries}
    return record


@settings(max_examples=60, deadline=None)
@given(runs_or_failures())
def test_no_target_is_met_or_missed_without_a_measured_figure(record: dict[str, Any]) -> None:
    summary = report.summaries(record)
    for t in report.targets(record, summary):
        if t["met"] is None:
            assert t["value"] is None and t["shown"] == "not measured" and t["why"]
        else:
            assert isinstance(t["value"], float) and t["why"] is None
    for row in targets_table(report.markdown(record, None)):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[-1] in ("met", "**MISSED**", "**not measured**"), row
        assert (cells[-1] == "**not measured**") == cells[2].startswith("not measured"), row


def test_write_records_why_a_target_was_not_measured(tmp_path: Path) -> None:
    record = results(**{"udp-1g": {"errors": {SPLICE: ["no datagram reached the server (10 sent)"]}}})
    report.write(record, tmp_path, with_chart=False)
    saved = json.loads((tmp_path / "bench.json").read_text())
    loss = next(t for t in saved["targets"] if t["target"].startswith("UDP loss"))
    assert loss["met"] is None and loss["value"] is None and "no datagram reached the server" in loss["why"]


def test_the_chart_draws_each_median_with_its_range(tmp_path: Path) -> None:
    record = results(**{"tcp-1": {"runs": {SPLICE: [{"gbit_per_s": v, "cpu_s_per_gb": c}
                                                     for v, c in ((6, 0.4), (7, 0.5), (9, 0.7))],
                                           DOCKER_PROXY: [{"gbit_per_s": 5.0, "cpu_s_per_gb": 0.8}]},
                                  "errors": {KERNEL: ["iperf3's server received no byte"]}}})
    record["memory"] = {"idle": {"count": 10, "results": {SPLICE: {"error": "no connection was held"}}}}
    panels = {title: spreads for title, _unit, spreads, _log in report.chart_panels(record)}
    assert panels["TCP throughput, 1 stream (iperf3)"] == {SPLICE: (7, 6, 9), DOCKER_PROXY: (5.0, 5.0, 5.0)}
    assert panels["tcp-1: relay CPU per unit"][SPLICE] == (0.5, 0.4, 0.7)
    assert not any("idle" in title for title in panels)  # a failed figure is no bar
    pytest.importorskip("matplotlib")
    assert report.chart(record, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
