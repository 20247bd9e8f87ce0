"""A CNI runtime in miniature, for the tests and the benchmark: Debian's reference plugins,
invoked per the CNI spec inside namespaces of our own.

- :func:`debian_plugins` puts Debian's ``containernetworking-plugins`` (``bridge``,
  ``host-local``, ``portmap``) and ``iptables`` (which ``portmap`` 1.1.1 shells out to) into
  a cache directory with ``apt-get download`` + ``dpkg -x``: nothing is installed, no
  service starts, and a fresh machine fills the cache on first use.
- :class:`Chain` runs a two-plugin conflist (``bridge`` then a port-mapping plugin) the way
  libcni does: ADD in order feeding each plugin the previous result, DEL in reverse order
  with the cached result, CHECK with the final one. It runs in a namespace that stands for
  the runtime's (the "host"), each container in a namespace of its own; host-local keeps
  its leases in a directory the caller owns.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..netns import Namespace

CACHE = Path(os.environ.get("PORTPROXY_TEST_CACHE", "/var/cache/portproxy-test")) / "cni"
PACKAGES = ("containernetworking-plugins", "iptables")
LIBDIR = "usr/lib/x86_64-linux-gnu/xtables"
IPTABLES_NAMES = ("iptables", "ip6tables", "iptables-save", "ip6tables-save", "iptables-restore", "ip6tables-restore")


class ReferenceUnavailable(RuntimeError):
    """The reference plugins cannot be made available; the message says why."""


def debian_plugins(cache: Path = CACHE) -> Path:
    """The cache root holding the extracted packages (``usr/lib/cni/...``, ``bin/iptables``)."""
    done = cache / ".complete"
    if done.exists():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.parent) as tmp:
        root = Path(tmp) / "root"
        for package in PACKAGES:
            got = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
            debs = list(Path(tmp).glob(f"{package}_*.deb"))
            if got.returncode != 0 or not debs:
                raise ReferenceUnavailable(f"apt-get download {package} failed: {got.stderr.strip()[-300:]}")
            subprocess.run(["dpkg", "-x", str(debs[0]), str(root)], check=True)
        bindir = root / "bin"
        bindir.mkdir()
        for name in IPTABLES_NAMES:  # xtables-nft-multi picks its personality from argv[0]
            (bindir / name).symlink_to("../usr/sbin/xtables-nft-multi")
        if cache.exists():
            shutil.rmtree(cache)
        root.rename(cache)
    done.touch()
    return cache


def plugin_dir(where: Path, cache: Path) -> Path:
    """A CNI_PATH with the reference plugins and ``portproxy-cni`` (this venv's script)."""
    where.mkdir(parents=True, exist_ok=True)
    for name in ("bridge", "host-local", "portmap"):
        (where / name).symlink_to(cache / "usr/lib/cni" / name)
    (where / "portproxy-cni").symlink_to(Path(sys.executable).parent / "portproxy-cni")
    return where


@dataclasses.dataclass
class Invocation:
    rc: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout) if self.stdout.strip() else None


@dataclasses.dataclass
class Chain:
    """``bridge`` + one port-mapping plugin (``portmap`` or ``portproxy-cni``), as a conflist."""

    host: Namespace
    plugins: Path
    cache: Path
    data_dir: Path
    mapper: str
    version: str = "1.0.0"
    name: str = "pptest"
    bridge: str = "cni-pp0"
    subnet4: str = "10.88.7.0/24"
    subnet6: str = "fd00:88:7::/64"
    mapper_conf: dict = dataclasses.field(default_factory=dict)
    results: dict[str, dict] = dataclasses.field(default_factory=dict)
    """Container id → the ADD result libcni would cache."""

    def env(self, command: str, container_id: str = "", netns: str = "", ifname: str = "eth0") -> dict[str, str]:
        env = {
            "CNI_COMMAND": command, "CNI_PATH": str(self.plugins),
            "PATH": f"{self.cache / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin",
            "XTABLES_LIBDIR": str(self.cache / LIBDIR),
            "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=web",
        }
        if container_id:
            env["CNI_CONTAINERID"] = container_id
            env["CNI_IFNAME"] = ifname
        if netns:
            env["CNI_NETNS"] = f"/run/netns/{netns}"
        return env

    def invoke(self, plugin: str, env: dict[str, str], stdin: bytes | str) -> Invocation:
        """Run one plugin in the host namespace, exactly as a runtime would."""
        proc = self.host.popen([str(self.plugins / plugin)], env=env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        data = stdin.encode() if isinstance(stdin, str) else stdin
        out, err = proc.communicate(data, timeout=120)
        return Invocation(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))

    # --- plugin configurations -------------------------------------------------------
    def bridge_conf(self) -> dict:
        return {
            "type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": False, "hairpinMode": True,
            "ipam": {"type": "host-local", "dataDir": str(self.data_dir),
                     "ranges": [[{"subnet": self.subnet4}], [{"subnet": self.subnet6}]],
                     "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]},
        }

    def mapper_entry(self) -> dict:
        return {"type": self.mapper, "capabilities": {"portMappings": True}, **self.mapper_conf}

    def conf(self, plugin: dict, prev: dict | None = None, port_mappings: list[dict] | None = None) -> dict:
        conf = {"cniVersion": self.version, "name": self.name, **plugin}
        conf.pop("capabilities", None)
        if port_mappings is not None:
            conf["runtimeConfig"] = {"portMappings": port_mappings}
        if prev is not None:
            conf["prevResult"] = prev
        return conf

    # --- the runtime's three operations -----------------------------------------------
    def add(self, container_id: str, netns: str, port_mappings: list[dict]) -> dict:
        env = self.env("ADD", container_id, netns)
        first = self.invoke("bridge", env, json.dumps(self.conf(self.bridge_conf())))
        if first.rc != 0:
            raise AssertionError(f"bridge ADD failed: {first.stdout} {first.stderr}")
        second = self.invoke(self.mapper, env, json.dumps(self.conf(self.mapper_entry(), first.json, port_mappings)))
        if second.rc != 0:
            raise AssertionError(f"{self.mapper} ADD failed: {second.stdout} {second.stderr}")
        self.results[container_id] = second.json
        return second.json

    def mapper_call(self, command: str, container_id: str, netns: str, port_mappings: list[dict] | None,
                    prev: dict | None = None, extra: dict | None = None) -> Invocation:
        conf = self.conf({**self.mapper_entry(), **(extra or {})}, prev, port_mappings)
        return self.invoke(self.mapper, self.env(command, container_id, netns), json.dumps(conf))

    def check(self, container_id: str, netns: str, port_mappings: list[dict]) -> Invocation:
        return self.mapper_call("CHECK", container_id, netns, port_mappings, self.results[container_id])

    def delete(self, container_id: str, netns: str, port_mappings: list[dict]) -> None:
        prev = self.results.get(container_id)
        env = self.env("DEL", container_id, netns)
        for plugin in (self.mapper, "bridge"):
            entry = self.mapper_entry() if plugin == self.mapper else self.bridge_conf()
            got = self.invoke(plugin, env, json.dumps(self.conf(entry, prev, port_mappings if plugin == self.mapper
                                                                else None)))
            if got.rc != 0:
                raise AssertionError(f"{plugin} DEL failed: {got.stdout} {got.stderr}")
        self.results.pop(container_id, None)
