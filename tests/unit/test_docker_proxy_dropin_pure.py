"""The docker-proxy drop-in's Go flag syntax and its version and usage answers, without a namespace."""

from __future__ import annotations

import socket
import subprocess

import pytest

from portproxy.dockerproxy import Request, UsageError, parse_go_flags, parse_go_int
from tests.support.docker_proxy import DROPIN


def test_version_and_bad_flags() -> None:
    for flag in ("-v", "--version"):
        out = subprocess.run([DROPIN, flag], capture_output=True, text=True, timeout=20)
        assert out.returncode == 0 and out.stdout.startswith("portproxy-docker-proxy")
    out = subprocess.run([DROPIN, "-bogus"], capture_output=True, text=True, timeout=20)
    assert out.returncode == 2 and "flag provided but not defined: -bogus" in out.stderr


@pytest.mark.parametrize("text,value", [("9090", 9090), ("0x2382", 9090), ("0X2382", 9090), ("021602", 9090),
                                        ("0o21602", 9090), ("0b10", 2), ("0x_23_82", 9090), ("9_090", 9090), ("0_21602", 9090),
                                        ("-1", -1), ("+80", 80)])
def test_go_integers(text: str, value: int) -> None:
    assert parse_go_int(text, "host-port") == value


@pytest.mark.parametrize("text", ["", "_9090", "9090_", "90__90", "0x", "08", "1e3", " 80", "0x__1", "9223372036854775808"])
def test_go_integers_refused(text: str) -> None:
    with pytest.raises(UsageError, match=f'invalid value "{text}" for flag -host-port'):
        parse_go_int(text, "host-port")


def test_go_flag_forms() -> None:
    parsed = parse_go_flags(["--proto=udp", "-host-port", "80", "-use-listen-fd=T", "--", "-bogus"])
    assert parsed["proto"] == "udp" and parsed["host-port"] == "80" and parsed["use-listen-fd"] is True
    for argv, message in ((["-use-listen-fd=yes"], 'invalid boolean value "yes"'), (["-proto"], "needs an argument"),
                          (["---proto"], "bad flag syntax"), (["-nope"], "not defined: -nope")):
        with pytest.raises(UsageError, match=message):
            parse_go_flags(argv)


def test_ipv4_mapped_host_address_is_ipv4() -> None:
    request = Request(parse_go_flags(["-host-ip", "::ffff:127.0.0.1", "-host-port", "80", "-container-ip",
                                      "10.0.0.2", "-container-port", "80"]))
    assert request.host.family == socket.AF_INET and request.where == "127.0.0.1:80/tcp"
