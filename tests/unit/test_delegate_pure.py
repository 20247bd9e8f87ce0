"""Delegation without a daemon: the request the drop-in writes is the one the daemon reads, the answers, the paths, the lean start."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from portproxy.controller.delegate import delegate_path, parse_request
from portproxy.defaults import DEFAULT_SOCKET as DAEMON_DEFAULT_SOCKET
from portproxy.dockerproxy import (
    DEFAULT_SOCKET,
    OTHER_NAMESPACE,
    Endpoint,
    Request,
    delegation_request,
    parse_answer,
    parse_go_flags,
)
from tests.support.docker_proxy import DROPIN, flags


def test_the_request_the_dropin_writes_is_the_one_the_daemon_reads() -> None:
    for host, container in (("0.0.0.0", "172.17.0.2"), ("::", "172.17.0.2"), ("::1", "fd00::2")):
        request = Request(parse_go_flags(flags("udp", host, 53, container, 5353)))
        mapping, owner, _settings = parse_request(delegation_request(request, 4242))
        assert mapping.host_ip is not None and str(mapping.host_ip) == Endpoint.parse(host, "h").text
        assert str(mapping.target_ip) == container and (mapping.host_port, mapping.target_port) == (53, 5353)
        assert owner["kind"] == "docker" and "4242" in owner["id"] and owner["container"].endswith(":5353")


def test_answers_and_paths() -> None:
    assert parse_answer(json.dumps({"ok": True}).encode()) is None
    assert parse_answer(json.dumps({"error": 'port "9090" \u00e9 in use\\'}).encode()) == 'port "9090" \u00e9 in use\\'
    assert parse_answer(json.dumps({"ok": False, "reason": "namespace"}).encode()) == OTHER_NAMESPACE
    assert "closed" in (parse_answer(b"") or "")
    assert DEFAULT_SOCKET == str(DAEMON_DEFAULT_SOCKET)
    assert delegate_path(Path("/run/x/pp.sock")) == Path("/run/x/pp.sock.delegate")


def test_the_script_starts_lean_also_through_a_symlink(tmp_path) -> None:
    """The script's shell line runs the python3 beside its target with -IS (no site module),
    also when linked from a directory with another python3 in it (as /usr/local/bin may be)."""
    (tmp_path / "python3").write_text("#!/bin/sh\necho wrong python\n")
    (tmp_path / "python3").chmod(0o755)
    (tmp_path / "portproxy-docker-proxy").symlink_to(DROPIN)
    for path in (DROPIN, str(tmp_path / "portproxy-docker-proxy")):
        done = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and done.stdout.startswith("portproxy-docker-proxy (portproxy "), done
