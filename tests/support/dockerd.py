"""A real dockerd (Debian 12's docker.io) for tests, contained in namespaces the test makes.

* Debian's packages are fetched with ``apt-get download`` and unpacked with ``dpkg -x`` into a
  cache (never installed, so no service starts); see :func:`docker_root`.
* dockerd runs inside a network namespace of the test and a private mount namespace
  (``unshare -m --propagation private``), where a tmpfs hides /run (containerd 1.6 puts its shim
  sockets under /run/containerd whatever its flags say). Every path of dockerd and of the
  containerd it manages (data-root, exec-root, pidfile, socket, containerd root/state/address)
  is under the test's temporary directory; containers get a cgroup parent of their own.
* ``--iptables=false``: every published port is served by the userland proxy under test, from
  outside as from loopback and from other containers (with iptables dockerd would DNAT outside
  IPv4 traffic past the proxy).
* No registry: the image is imported from a tarball holding Debian's busybox-static (HTTP with
  ``busybox httpd``); busybox has no UDP server, so the UDP echo is a few lines of the host's
  python3, reached through a read-only bind mount of /usr.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Iterator

from portproxy.lab.namespaces import Namespace

from . import programs

IMAGE = "portproxy-test/busybox:1"
BRIDGE_CIDR = "10.99.0.1/24"
BRIDGE_IP = "10.99.0.1"
FIXED_CIDR_V6 = "fd00:dead::/64"

UDP_ECHO = b"""import socket, sys
try:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.bind(("::", int(sys.argv[1])))
except OSError:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(data, peer)
"""

PROBE = b"""import json, socket, sys, urllib.request
out = {}
for target in sys.argv[1:]:
    proto, host, port = target.split(",")
    try:
        if proto == "tcp":
            url = "http://%s:%s/" % ("[%s]" % host if ":" in host else host, port)
            out[target] = urllib.request.urlopen(url, timeout=5).read().decode()
        else:
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(3)
            s.connect((host, int(port)))  # connected, as resolvers: replies from elsewhere are dropped
            s.send(b"ping " + target.encode())
            out[target] = s.recv(65535).decode()
    except Exception as exc:
        out[target] = "error: %s" % exc
print(json.dumps(out))
"""
PAGE = "hello from the container\n"


class DockerUnavailable(Exception):
    """The packages could not be fetched (no Debian archive reachable): tests skip."""


def docker_root() -> Path:
    """The unpacked packages (``ROOT/usr/sbin/dockerd`` etc.), fetched once per machine by
    portproxy's one fetch mechanism (portproxy.debcache: apt-get download + dpkg -x)."""
    try:
        return programs.tree("dockerd")
    except programs.ToolUnavailable as exc:
        raise DockerUnavailable(str(exc)) from None


def image_tarball(root: Path) -> bytes:
    """A root filesystem: busybox and its applet links, the HTTP page, the UDP scripts,
    and /lib, /lib64 pointing into the /usr that the containers get from the host."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add(name: str, data: bytes | None = None, mode: int = 0o644, link: str | None = None) -> None:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
            elif data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            else:
                info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data) if data is not None else None)

        for d in ("bin", "usr", "www", "tmp", "proc", "sys", "dev", "etc", "run"):
            add(d)
        add("bin/busybox", (root / "bin" / "busybox").read_bytes(), 0o755)
        for applet in ("sh", "httpd", "sleep", "wget", "cat"):
            add(f"bin/{applet}", link="busybox")
        add("lib", link="usr/lib")
        add("lib64", link="usr/lib64")
        add("www/index.html", PAGE.encode())
        add("udp_echo.py", UDP_ECHO)
        add("probe.py", PROBE)
    return buf.getvalue()


def _ns_inode(pid: int | str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino
    except OSError:
        return None


def root_namespace_snapshot() -> dict[str, str]:
    """What a test must leave as it found it in the root network namespace."""
    commands = {
        "links": ["ip", "-o", "link", "show"], "addresses": ["ip", "-o", "addr", "show"],
        "routes4": ["ip", "-4", "route", "show", "table", "all"], "routes6": ["ip", "-6", "route", "show", "table", "all"],
        "rules": ["ip", "rule", "show"], "nft": ["nft", "list", "ruleset"],
    }
    return {key: subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout
            for key, argv in commands.items()}


class Dockerd:
    """One dockerd (with its containerd) inside ``ns``, everything under ``tmp``."""

    def __init__(self, ns: Namespace, tmp: Path, proxy_path: str, ipv6: bool, env: dict[str, str] | None = None) -> None:
        self.ns, self.tmp, self.proxy_path, self.ipv6 = ns, tmp, proxy_path, ipv6
        self.root = docker_root()
        self.socket = tmp / "docker.sock"
        self.cgroup_parent = f"portproxy-test-{ns.name}"
        self.proc: subprocess.Popen | None = None
        self.mnt_ns: int | None = None
        self.env = {
            "PATH": f"{self.root}/usr/bin:{self.root}/usr/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
            "DOCKER_HOST": f"unix://{self.socket}", "DOCKER_CONFIG": str(tmp / "cli"), "HOME": str(tmp),
            **(env or {}),  # what dockerd passes on to the proxies it starts (PORTPROXY_SOCKET)
        }

    def start(self) -> None:
        (self.tmp / "daemon.json").write_text("{}")
        args = [
            f"{self.root}/usr/sbin/dockerd", "--config-file", str(self.tmp / "daemon.json"),
            "--host", f"unix://{self.socket}", "--pidfile", str(self.tmp / "docker.pid"),
            "--data-root", str(self.tmp / "data"), "--exec-root", str(self.tmp / "exec"),
            "--storage-driver", "vfs", "--exec-opt", "native.cgroupdriver=cgroupfs",
            "--cgroup-parent", self.cgroup_parent, "--bip", BRIDGE_CIDR, "--iptables=false", "--ip-masq=false",
            "--userland-proxy=true", "--userland-proxy-path", self.proxy_path, "--log-level", "warn",
            "--no-new-privileges=false",
        ]
        if self.ipv6:
            args += ["--ipv6", "--fixed-cidr-v6", FIXED_CIDR_V6]
        # containerd 1.6 puts shim sockets in /run/containerd/s whatever its flags: a tmpfs on
        # /run, only in the private mount namespace, keeps them (and all else) off the host.
        script = 'mount -t tmpfs -o mode=755 portproxy-test /run && exec "$@"'
        with open(self.tmp / "dockerd.log", "wb") as log:
            self.proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.ns.name}", "unshare", "-m", "--propagation", "private",
                 "sh", "-c", script, "sh", *args],
                stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited: {self.log()[-2000:]}")
            if self.socket.exists() and self.docker("version", check=False, timeout=10).returncode == 0:
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"dockerd did not answer: {self.log()[-2000:]}")
        self.mnt_ns = _ns_inode(self.proc.pid)
        tar = self.tmp / "image.tar"
        tar.write_bytes(image_tarball(self.root))
        self.docker("import", str(tar), IMAGE)

    def log(self) -> str:
        return (self.tmp / "dockerd.log").read_text(errors="replace")

    def docker(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        done = subprocess.run([f"{self.root}/usr/bin/docker", *args], capture_output=True, text=True, env=self.env,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)}: {done.stderr.strip()}")
        return done

    def run_server(self, *publish: str, name: str) -> subprocess.CompletedProcess:
        """A container serving HTTP on 8080 and 8100-8102 and UDP echo on 5353; ``docker run``'s result."""
        cmd = ("for p in 8080 8100 8101 8102; do httpd -p $p -h /www; done; "
               "exec /usr/bin/python3 /udp_echo.py 5353")
        args = ["run", "-d", "--name", name, "-v", "/usr:/usr:ro"]
        for p in publish:
            args += ["-p", p]
        return self.docker(*args, IMAGE, "sh", "-c", cmd, check=False)

    def container_ip(self, name: str) -> str:
        return self.docker("inspect", "-f", "{{.NetworkSettings.IPAddress}}", name).stdout.strip()

    def probe(self, *targets: str) -> dict[str, str]:
        """Reach each ``proto,host,port`` from another container on the bridge."""
        out = self.docker("run", "--rm", "-v", "/usr:/usr:ro", IMAGE, "/usr/bin/python3", "/probe.py", *targets,
                          timeout=180)
        return json.loads(out.stdout)

    def processes(self) -> list[tuple[int, str]]:
        """(pid, command line) of every process in dockerd's mount namespace."""
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and self.mnt_ns is not None and _ns_inode(entry) == self.mnt_ns:
                with contextlib.suppress(OSError):
                    found.append((int(entry), Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()))
        return found

    def proxies(self) -> list[str]:
        """Command lines of the userland proxies: docker-proxy's and a delegated drop-in's waiting
        shell start with the proxy's path, the drop-in's with its interpreter and flags."""
        return [cmd for _, cmd in self.processes() if self.proxy_path in cmd.split()[:3]]

    def stop(self) -> None:
        """Remove the containers, stop dockerd, then kill whatever is left in its mount namespace."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                ids = self.docker("ps", "-aq", check=False, timeout=30).stdout.split()
                if ids:
                    self.docker("rm", "-f", *ids, check=False, timeout=60)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for _ in range(50):
            left = self.processes()
            if not left:
                break
            for pid, _cmd in left:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        for controller in Path("/sys/fs/cgroup").iterdir():
            for sub in sorted(controller.glob(f"{self.cgroup_parent}*/**/"), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    sub.rmdir()
        self.proc = None


@contextlib.contextmanager
def running_dockerd(ns: Namespace, tmp: Path, proxy_path: str, ipv6: bool,
                    env: dict[str, str] | None = None) -> Iterator[Dockerd]:
    daemon = Dockerd(ns, tmp, proxy_path, ipv6, env)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
