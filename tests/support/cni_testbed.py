"""A CNI runtime in miniature, for the tests and the benchmark: Debian's reference plugins,
invoked per the CNI spec inside namespaces of our own.

- :func:`debian_plugins` puts Debian's ``containernetworking-plugins`` (``bridge``,
  ``host-local``, ``portmap``) and ``iptables`` (which ``portmap`` 1.1.1 shells out to) into
  portproxy.debcache's cache (``apt-get download`` + ``dpkg -x``, see tests.support.programs):
  nothing is installed, no service starts, and a fresh machine fills the cache on first use.
- :class:`Chain` runs a two-plugin conflist (``bridge`` then a port-mapping plugin) the way
  libcni does: ADD in order feeding each plugin the previous result, DEL in reverse order
  with the cached result, CHECK with the final one. It runs in a namespace that stands for
  the runtime's (the "host"), each container in a namespace of its own; host-local keeps
  its leases in a directory the caller owns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import resource
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

from portproxy.lab.namespaces import Namespace
from portproxy.lab.topology import DemoTopology

from . import programs

LIBDIR = "usr/lib/x86_64-linux-gnu/xtables"
SUBNET = "10.88.0.0/16"
GATEWAY = "10.88.0.1"
IPTABLES_NAMES = ("iptables", "ip6tables", "iptables-save", "ip6tables-save", "iptables-restore", "ip6tables-restore")


class ReferenceUnavailable(RuntimeError):
    """The reference plugins cannot be made available; the message says why."""


def debian_packages(name: str) -> Path:
    """The tree of the test program ``name`` (apt-get download + dpkg -x, never installed):
    portproxy.debcache, the one fetch mechanism of the tests and benchmarks."""
    try:
        return programs.tree(name)
    except programs.ToolUnavailable as exc:
        raise ReferenceUnavailable(str(exc)) from None


def debian_plugins() -> Path:
    """The tree holding Debian's plugins and iptables (``usr/lib/cni/...``, ``bin/iptables``)."""
    cache = debian_packages("cni-plugins")
    bindir = cache / "bin"
    bindir.mkdir(exist_ok=True)
    for name in IPTABLES_NAMES:  # xtables-nft-multi picks its personality from argv[0]
        if not (bindir / name).is_symlink():
            (bindir / name).symlink_to("../usr/sbin/xtables-nft-multi")
    return cache


def podman_packages() -> Path:
    """Debian 12's podman 4.3 with conmon, crun and busybox-static, extracted (never installed)."""
    return debian_packages("podman")


def root_snapshot() -> tuple[str, ...]:
    """The calling process's network namespace as far as tests must leave it: links, routes, nft."""
    def run(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

    links = sorted(line.split(":")[1].strip() for line in run("ip", "-o", "link").splitlines())
    return ("\n".join(links), run("ip", "route"), run("ip", "-6", "route"), run("nft", "list", "ruleset"))


DAEMON_CONFIG = "[options]\nroute_localnet = true\nset_sysctls = true\n"
"""A ``portproxy serve`` that serves CNI mappings as portmap does: loopback included."""


@contextlib.contextmanager
def portproxy_daemon(ns: Namespace, where: Path) -> Iterator[Path]:
    """``portproxy serve`` in ``ns`` with its config, state and socket under ``where``; yields the socket."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "portproxy.toml").write_text(DAEMON_CONFIG)
    sock = where / "pp.sock"
    proc = ns.popen([sys.executable, "-m", "portproxy", "serve", "--config", str(where / "portproxy.toml"),
                     "--state-dir", str(where / "state"), "--socket", str(sock), "--metrics-addr", "off"],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        if not proc.stdout.readline().startswith("ready"):
            raise RuntimeError(f"portproxy serve exited {proc.wait(timeout=10)}")
        yield sock
    finally:
        proc.terminate()
        proc.wait(timeout=30)


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
        out, err = proc.communicate(data, timeout=600)
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


def _wrapper(path: Path, program: Path, env: dict[str, str]) -> Path:
    """An executable ``path`` that runs ``program`` with ``env`` added to its environment."""
    exports = "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())
    path.write_text(f"#!/bin/sh\n{exports}exec {shlex.quote(str(program))} \"$@\"\n")
    path.chmod(0o755)
    return path


class Podman:
    """podman, conmon and crun from the cache, all state under ``tmp``, in one mount namespace."""

    def __init__(self, topo: DemoTopology, tmp: Path, podman: Path, cni: Path, mapper: str,
                 mapper_conf: dict | None = None) -> None:
        self.topo, self.tmp, self.root = topo, tmp, podman
        lib = podman / "usr/lib/x86_64-linux-gnu"
        plugins = tmp / "cnibin"
        plugins.mkdir()
        for name in ("bridge", "host-local", "portmap"):
            (plugins / name).symlink_to(cni / "usr/lib/cni" / name)
        (plugins / "portproxy-cni").symlink_to(Path(sys.executable).parent / "portproxy-cni")
        (tmp / "cniconf").mkdir()
        (tmp / "cniconf/podman.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": "podman", "plugins": [
                {"type": "bridge", "bridge": "cni-podman0", "isGateway": True, "ipMasq": False, "hairpinMode": True,
                 "ipam": {"type": "host-local", "dataDir": str(tmp / "ipam"), "routes": [{"dst": "0.0.0.0/0"}],
                          "ranges": [[{"subnet": SUBNET, "gateway": GATEWAY}]]}},
                {"type": mapper, "capabilities": {"portMappings": True}, **(mapper_conf or {})}]}))
        # podman hands conmon a fixed environment (PATH, HOME, CONTAINERS_CONF, XDG_RUNTIME_DIR):
        # no LD_LIBRARY_PATH for the extracted libraries, no XTABLES_LIBDIR for portmap's
        # iptables. conmon passes its own environment to crun and to podman's exit command
        # (``podman ... container cleanup <id>``, the CNI DEL of a container exiting by
        # itself), so wrappers that set both make those children work unchanged.
        wrapped = {"LD_LIBRARY_PATH": str(lib), "XTABLES_LIBDIR": str(cni / LIBDIR)}
        crun = _wrapper(tmp / "crun", podman / "usr/bin/crun", wrapped)
        conmon = _wrapper(tmp / "conmon", podman / "usr/bin/conmon", wrapped)
        soft_n, hard_n = resource.getrlimit(resource.RLIMIT_NOFILE)
        pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
        nproc = [pid_max if v == resource.RLIM_INFINITY else min(v, pid_max)
                 for v in resource.getrlimit(resource.RLIMIT_NPROC)]
        (tmp / "containers.conf").write_text(f"""
[containers]
cgroups = "disabled"
default_ulimits = ["nofile={soft_n}:{hard_n}", "nproc={nproc[0]}:{nproc[1]}"]
seccomp_profile = "{podman}/usr/share/containers/seccomp.json"
[network]
network_backend = "cni"
cni_plugin_dirs = ["{plugins}"]
network_config_dir = "{tmp / 'cniconf'}"
default_network = "podman"
[engine]
cgroup_manager = "cgroupfs"
events_logger = "none"
conmon_path = ["{conmon}"]
runtime = "crun"
tmp_dir = "{tmp / 'tmpdir'}"
[engine.runtimes]
crun = ["{crun}"]
""")
        # runroot on the private /run tmpfs: the exit command repeats it as ``--runroot``, and
        # podman refuses a --runroot longer than 50 characters (a temp dir's path often is)
        (tmp / "storage.conf").write_text(f'[storage]\ndriver = "vfs"\ngraphroot = "{tmp / "storage"}"\n'
                                          'runroot = "/run/containers/storage"\n')
        rootfs = tmp / "rootfs"
        for d in ("bin", "www", "proc", "sys", "dev", "etc", "tmp"):
            (rootfs / d).mkdir(parents=True)
        (rootfs / "bin/busybox").write_bytes((podman / "bin/busybox").read_bytes())
        (rootfs / "bin/busybox").chmod(0o755)
        for applet in ("sh", "httpd", "nc", "printf", "sleep"):
            (rootfs / "bin" / applet).symlink_to("busybox")
        (rootfs / "www/index.html").write_text("hello from podman\n")
        for merged in ("lib", "lib64"):  # the host's /usr, mounted read-only, runs as in Debian
            (rootfs / merged).symlink_to(f"usr/{merged}")
        self.rootfs = rootfs
        self.env = {
            "CONTAINERS_CONF": str(tmp / "containers.conf"), "CONTAINERS_STORAGE_CONF": str(tmp / "storage.conf"),
            "LD_LIBRARY_PATH": str(lib), "PATH": f"{cni / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin",
            "XTABLES_LIBDIR": str(cni / LIBDIR), "HOME": str(tmp),
        }
        setup = "mount -t tmpfs tmpfs /run && mount -t tmpfs tmpfs /var/lib && mkdir /run/netns && " \
                "mount -t cgroup2 none /sys/fs/cgroup && echo ready && exec sleep infinity"
        self.holder = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "nsenter", f"--net=/run/netns/{topo.host.name}",
             "sh", "-c", setup], stdout=subprocess.PIPE, text=True)
        assert self.holder.stdout is not None and self.holder.stdout.readline().strip() == "ready"

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        got = subprocess.run(["nsenter", "-t", str(self.holder.pid), "-m", "-n", f"{self.root}/usr/bin/podman",
                              *args], env=self.env, capture_output=True, text=True, timeout=120)
        if check and got.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: {got.stderr}")
        return got

    def run_web(self, name: str, *publish: str) -> None:
        ports = [arg for p in publish for arg in ("-p", p)]
        self("run", "-d", "--cgroups=disabled", "--name", name, *ports, "--rootfs", str(self.rootfs),
             "/bin/httpd", "-f", "-p", "8080", "-h", "/www")

    UDP_REPLY = ("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('', 5353))\n"
                 "while True:\n    data, peer = s.recvfrom(512)\n    s.sendto(b'udp ' + peer[0].encode(), peer)\n")
    """A UDP service answering each datagram with the address it came from (busybox has none:
    the host's python3, its /usr mounted read-only into the container)."""

    def run_udp(self, name: str, publish: str) -> None:
        self("run", "-d", "--cgroups=disabled", "--name", name, "-p", publish, "-v", "/usr:/usr:ro",
             "--rootfs", str(self.rootfs), "/usr/bin/python3", "-c", self.UDP_REPLY)

    def get_from_container(self, host: str, port: int) -> str:
        """GET / from a second container (busybox nc: the static wget crashes resolving names)."""
        got = self("run", "--rm", "--cgroups=disabled", "--rootfs", str(self.rootfs), "/bin/sh", "-c",
                   f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {host} {port}", check=False)
        if got.returncode != 0:
            return f"failed {got.returncode}: {got.stderr.strip()[-200:]}"
        return got.stdout.replace("\r\n", "\n").split("\n\n", 1)[-1]

    def close(self) -> None:
        self("rm", "-a", "-f", "-t", "0", check=False)
        self.holder.kill()
        self.holder.wait()
