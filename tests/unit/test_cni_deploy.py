"""deploy/: the Kubernetes manifests pass the API schema (PyPI's kubernetes-validate, offline) and
yamllint; the conflist puts portproxy-cni where portmap was and the plugin accepts its entry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from portproxy.cni.protocol import parse_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
BIN = Path(sys.executable).parent
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))


def validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "--no-warn", str(path)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_the_kubernetes_schema(manifest: Path) -> None:
    got = validate(manifest)
    assert got.returncode == 0, got.stdout + got.stderr


def test_schema_check_is_not_vacuous(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text((DEPLOY / "daemonset.yaml").read_text().replace("hostNetwork: true", "hostNetwork: yes-please"))
    assert validate(broken).returncode != 0


def test_yamllint() -> None:
    got = subprocess.run([str(BIN / "yamllint"), "--strict", "-c", str(DEPLOY / ".yamllint"), *map(str, MANIFESTS)],
                         capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stdout + got.stderr


def test_conflist_puts_portproxy_where_portmap_was() -> None:
    conflist = json.loads((DEPLOY / "cni-conflist.json").read_text())
    types = [plugin["type"] for plugin in conflist["plugins"]]
    assert types == ["bridge", "portproxy-cni", "firewall", "tuning"]
    entry = conflist["plugins"][1]
    assert entry["capabilities"] == {"portMappings": True}
    conf = parse_config({"cniVersion": conflist["cniVersion"], "name": conflist["name"], **entry})
    assert conf.snat and conf.port_mappings == ()
    assert conf.daemon_socket == "/run/portproxy/portproxy.sock"  # where the DaemonSet puts it
