"""Programs from Debian's packages, unpacked, never installed: what ``portproxy bench`` runs.

Installing nginx, HAProxy or docker.io on a systemd host starts their services (a web
server on port 80, a docker daemon): nothing a port proxy's benchmark may leave on a
host. So the programs the benchmark drives are fetched with ``apt-get download`` and
unpacked with ``dpkg -x`` into a cache directory: no maintainer script runs, no service
starts, nothing is registered with dpkg. Libraries a program needs beyond a Debian 12
with setup.sh's packages come along in the same tree and are found through
``LD_LIBRARY_PATH``; ``command`` checks with ldd.

One mechanism, one place: ``command("haproxy")`` is the argv prefix that runs HAProxy,
fetching it on first use; a caller with programs of its own (the tests) passes its own
``tools`` table. ``python -m portproxy.debcache`` fetches every program of :data:`TOOLS`.
The cache is ``/var/cache/portproxy-test/unpacked`` (``PORTPROXY_TOOL_CACHE`` overrides it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Iterator, Mapping


class ToolUnavailable(RuntimeError):
    """A program could not be fetched or would not run (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Tool:
    """A program: the package that has it, its path inside, and the library packages it
    needs that a minimal Debian 12 with setup.sh's packages does not have (ldd says which)."""

    package: str
    path: str
    libraries: tuple[str, ...] = ()


TOOLS: dict[str, Tool] = {
    "nginx": Tool("nginx", "usr/sbin/nginx"),
    "haproxy": Tool("haproxy", "usr/sbin/haproxy", ("liblua5.3-0", "libopentracing-c-wrapper0", "libopentracing1")),
    "iperf3": Tool("iperf3", "usr/bin/iperf3", ("libiperf0", "libsctp1")),
    "sockperf": Tool("sockperf", "usr/bin/sockperf"),
    "wrk": Tool("wrk", "usr/bin/wrk", ("libluajit-5.1-2", "libluajit-5.1-common")),
    "socat": Tool("socat", "usr/bin/socat", ("libwrap0",)),
    "docker-proxy": Tool("docker.io", "usr/sbin/docker-proxy"),
}
"""Every program the benchmark runs that portproxy itself does not need."""


def cache_dir() -> Path:
    return Path(os.environ.get("PORTPROXY_TOOL_CACHE", "/var/cache/portproxy-test/unpacked"))


def _packages(tool: Tool) -> list[str]:
    """The package and the library packages ``tool`` needs."""
    return [tool.package, *sorted(set(tool.libraries))]


def tree(tool: Tool) -> Path:
    """Where ``tool``'s package and libraries are unpacked. The name carries a digest of the
    package list, so a tree unpacked before a package was added is never taken as complete."""
    digest = hashlib.sha256(" ".join(_packages(tool)).encode()).hexdigest()[:8]
    return cache_dir() / f"{tool.package}-{digest}"


def library_path(root: Path) -> str:
    """The unpacked tree's library directories, for LD_LIBRARY_PATH."""
    arch = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    dirs = [root / sub for sub in (f"usr/lib/{arch}", f"lib/{arch}", "usr/lib", "lib")]
    return ":".join(str(d) for d in dirs if d.is_dir())


def missing_libraries(binary: Path, libpath: str) -> list[str]:
    """Shared objects ``binary`` needs that neither the system nor the tree provides."""
    env = dict(os.environ, LD_LIBRARY_PATH=libpath) if libpath else None
    result = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=env)
    return [line.split()[0] for line in result.stdout.splitlines() if "not found" in line]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise fetches of one package across processes (tests, bench, setup.sh)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _fetch(tool: Tool) -> None:
    """apt-get download the package and its libraries, dpkg -x them into one tree."""
    root = tree(tool)
    with _locked(cache_dir() / f".{tool.package}.lock"):
        if root.is_dir():
            return
        with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=f".{tool.package}-") as tmp:
            packages = _packages(tool)
            for attempt in range(2):
                download = subprocess.run(["apt-get", "download", "-q", *packages], cwd=tmp, capture_output=True,
                                          text=True, timeout=900)
                if download.returncode == 0 or attempt:
                    break
                # A machine that never ran setup.sh may have no package lists yet.
                subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=900)
            if download.returncode != 0:
                reason = (download.stderr.strip().splitlines() or ["apt-get download failed"])[-1]
                raise ToolUnavailable(f"apt-get download {' '.join(packages)}: {reason}")
            unpacked = Path(tmp) / "root"
            for deb in sorted(Path(tmp).glob("*.deb")):
                subprocess.run(["dpkg", "-x", str(deb), str(unpacked)], check=True, capture_output=True, timeout=600)
            unpacked.rename(root)  # whole or not at all: a half-unpacked tree is never seen


def command(name: str, fetch: bool = True, tools: Mapping[str, Tool] = TOOLS) -> list[str]:
    """The argv prefix that runs program ``name`` of ``tools`` from the cache (fetched if ``fetch``).

    Raises ToolUnavailable with a one-line reason when it cannot be had or would not run.
    """
    tool = tools[name]
    binary = tree(tool) / tool.path
    if not binary.exists():
        if not fetch:
            raise ToolUnavailable(f"{name} is not in {cache_dir()} (command({name!r}) fetches it)")
        try:
            _fetch(tool)
        except (OSError, subprocess.SubprocessError) as exc:
            raise ToolUnavailable(f"{name}: {exc}") from None
        if not binary.exists():
            raise ToolUnavailable(f"{name}: package {tool.package} has no /{tool.path}")
    libpath = library_path(tree(tool))
    missing = missing_libraries(binary, libpath)
    if missing:
        raise ToolUnavailable(f"{name}: missing shared libraries {', '.join(missing)} (add their packages to TOOLS)")
    # env(1) execs the program in place: same pid, and the program's own name in /proc/PID/comm.
    return ["env", f"LD_LIBRARY_PATH={libpath}", str(binary)] if libpath else [str(binary)]


def program_of(argv: list[str]) -> str:
    """The program's own name in an argv that ``command`` may have prefixed with env(1)."""
    args = list(argv)
    if args and os.path.basename(args[0]) == "env":
        args = [a for a in args[1:] if "=" not in a] or args
    return os.path.basename(args[0]) if args else "?"


def available(name: str, tools: Mapping[str, Tool] = TOOLS) -> list[str] | None:
    """``command(name)``, or None (with the reason on stderr) where it cannot be had."""
    try:
        return command(name, tools=tools)
    except ToolUnavailable as exc:
        print(f"portproxy: {exc}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None, tools: Mapping[str, Tool] = TOOLS, prog: str = "portproxy.debcache") -> int:
    """Fetch the named programs of ``tools`` (default: all) into the cache; print where each is."""
    names = (argv if argv is not None else sys.argv[1:]) or list(tools)
    unknown = [n for n in names if n not in tools]
    if unknown:
        print(f"{prog}: unknown program(s): {', '.join(unknown)} (known: {', '.join(tools)})", file=sys.stderr)
        return 2
    failed = 0
    for name in names:
        try:
            print(f"{name}: {command(name, tools=tools)[-1]}")
        except ToolUnavailable as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
