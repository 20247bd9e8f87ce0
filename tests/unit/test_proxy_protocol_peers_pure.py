"""PROXY protocol options refused before anything runs."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("argv, line", [
    (["--mode", "kernel", "--proxy-protocol", "v1"], "DNAT cannot add a header"),
    (["5353:172.16.1.1:5353/udp", "--proxy-protocol", "v2"], "for TCP mappings"),
])
def test_refused_with_one_line(argv: list[str], line: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "portproxy", "map", "9090:172.16.1.1:8080", *argv],  # nothing runs
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert line in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
