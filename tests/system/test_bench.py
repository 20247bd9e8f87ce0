"""`portproxy bench --quick`: the harness end to end, so it keeps working (no thresholds here:
timing belongs in the committed results, not in tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from portproxy.bench.workloads import WORKLOADS

OUR_PATHS = ("direct", "kernel", "userland-splice", "userland-copy", "userland-asyncio", "auto")
RELAYING = ("userland-splice", "userland-copy", "userland-asyncio", "auto")
"""Our paths with a relay process (auto's proxy runs even while DNAT serves a mapping)."""
TOOLS = {"socat", "haproxy", "docker-proxy", "iperf3", "sockperf", "nginx", "wrk"}


RUN_TOKEN = f"PORTPROXY_TEST_BENCH_RUN={uuid.uuid4().hex}"
"""Set in the bench's environment, which every program it starts inherits: so the leak
check counts this run's programs only, not those of other runs on the same machine."""


def tool_processes() -> set[int]:
    """Live (not zombie) processes of the programs this test's bench run started."""
    found = set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "comm").read_text().strip() in TOOLS \
                    and " Z " not in (proc / "stat").read_text().rsplit(")", 1)[1][:3] \
                    and RUN_TOKEN.encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.add(int(proc.name))
        except OSError:
            continue
    return found


def bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    name, _, value = RUN_TOKEN.partition("=")
    return subprocess.run([sys.executable, "-m", "portproxy", "bench", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, name: value})


def test_quick_run_measures_every_path_and_writes_the_report(tmp_path: Path) -> None:
    result = bench("--quick", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert tool_processes() == set()  # socat's per-peer children included
    assert "[1/" in result.stderr  # progress while it runs
    record = json.loads((tmp_path / "bench.json").read_text())
    for workload in WORKLOADS:
        runs = record["workloads"][workload.key]["runs"]
        errors = record["workloads"][workload.key]["errors"]
        for path in OUR_PATHS:
            assert path in runs and not errors.get(path), (workload.key, path, errors.get(path))
            assert workload.metrics[0].key in runs[path][0]
    # Every path the machine has was tried; each either ran or says why not.
    for path in record["paths"]:
        tried = [w for w in record["workloads"].values() if path in w["runs"] or path in w["errors"]]
        assert tried, path
    # CPU per unit of work: the relay's for every relaying path, the machine's for every path.
    for path in OUR_PATHS:
        for workload, unit in (("conn-rate", "connection"), ("udp-1g", "datagram")):
            run = record["workloads"][workload]["runs"][path][0]
            assert run[f"machine_cpu_us_per_{unit}"] > 0, (workload, path)
            assert (run.get(f"cpu_us_per_{unit}", 0) > 0) == (path in RELAYING), (workload, path, run)
    memory = record["memory"]
    assert memory["mappings"]["results"]["userland-splice"]["rss_mib"] > 0
    for path, idle in memory["idle"]["results"].items():  # each relay held what it was measured on
        assert "error" in idle or idle["relay_sockets_opened"] >= 2 * idle["connections"], (path, idle)
    idle = memory["idle"]["results"]["userland-splice"]
    assert idle["kib_per_connection"] > 0 and idle["relay_sockets_opened"] >= 2 * idle["connections"]
    assert {t["target"] for t in record["targets"]} and all(t["value"] is not None for t in record["targets"]
                                                              if "docker-proxy" not in t["target"])
    # No failed measurement is reported as met (or missed): a verdict only on a figure.
    for t in record["targets"]:
        assert (t["met"] is None) == (t["value"] is None) == (t["why"] is not None), t
    markdown = (tmp_path / "bench.md").read_text()
    assert "## Targets" in markdown and "× docker-proxy" in markdown and "![chart](bench.png)" in markdown
    for row in markdown.split("## Targets", 1)[1].split("\n## ", 1)[0].splitlines():
        assert "not measured" not in row or row.endswith("| **not measured** |"), row
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_path_is_one_clear_line() -> None:
    result = bench("--paths", "warp-drive", "--no-memory")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["portproxy: bench: unknown or unavailable path(s): warp-drive"]


def test_unknown_workload_is_one_clear_line() -> None:
    result = bench("--workloads", "tcp-1,warp-drive", "--no-memory")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("portproxy: bench: unknown workload(s): warp-drive (known: tcp-1,")
