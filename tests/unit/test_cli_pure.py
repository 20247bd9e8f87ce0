"""The command line refuses bad input before anything runs: one readable line, exit status 2."""

from __future__ import annotations

import pytest

from tests.support.processes import run_portproxy


@pytest.mark.parametrize(
    "spec, names",
    [
        ("9090:172.16.1.1", "parts"),
        ("70000:172.16.1.1:8080", "host port '70000'"),
        ("9090:172.16.1.1:8080/sctp", "unknown protocol 'sctp'"),
        ("9090-9091:172.16.1.1:8080", "differ in length"),
        ("9090:not-an-ip:8080", "target address 'not-an-ip'"),
    ],
)
def test_malformed_spec_exit_2_one_line(spec: str, names: str) -> None:
    result = run_portproxy("map", "127.0.0.1:19090:127.0.0.1:8080", spec)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and names in lines[0] and lines[0].startswith("portproxy: ")
    assert "ready" not in result.stdout


def test_bad_option_exit_2() -> None:
    result = run_portproxy("map", "9090:172.16.1.1:8080", "--connect-timeout", "-1")
    assert result.returncode == 2
    assert "--connect-timeout" in result.stderr


def test_unknown_congestion_control_exit_2() -> None:
    result = run_portproxy("map", "127.0.0.1:19090:127.0.0.1:8080", "--target-cc", "no-such-cc")
    assert result.returncode == 2
    assert "argument --target-cc: 'no-such-cc' cannot be used: not available" in result.stderr
    assert "ready" not in result.stdout


def test_overlapping_mappings_rejected() -> None:
    result = run_portproxy("map", "9090:10.0.0.1:80", "9090:10.0.0.2:80")
    assert result.returncode == 2
    assert "overlap" in result.stderr
