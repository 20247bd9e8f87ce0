"""A real systemd (the root's own, e.g. Debian 12's 252) booted as PID 1 of a throw-away container.

The container is a Debian root (tests/support/debian_root.py) seen through an overlay, so
that what a test changes (units, drop-ins, installed packages) vanishes with it, inside:

* the test's network namespace (entered with ``nsenter --net``; nothing in the root one);
* new PID, mount (private propagation), UTS, IPC and cgroup namespaces: every mount the
  container makes, and every process it starts, dies with its PID 1;
* a child cgroup of the machine's own (``name=systemd`` v1 hierarchy and cgroup2), entered
  *before* the cgroup namespace is made, so the container's cgroup root is that child: the
  host's cgroups are never written, and the child is removed after;
* a tmpfs on /sys/fs/cgroup holding those two hierarchies (systemd's hybrid layout, without
  the v1 resource controllers; on a cgroup2-only machine, cgroup2 alone), a read-only sysfs,
  a minimal /dev of its own, a fresh /run and
  /tmp, ``container=portproxy-test`` in PID 1's environment (so systemd skips what only a
  real machine may do);
* the overlay as the root of its mount namespace (``pivot_root``; the host's tree unmounted).

Commands run inside with ``nsenter -a -r -w -t PID`` (all of PID 1's namespaces, its root and
directory): :meth:`BootedSystemd.run`. :meth:`kill` ends everything at once (SIGKILL to
PID 1), even when a test failed.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path



def cgroup_layout() -> tuple[str, tuple[Path, ...]] | None:
    """The machine's cgroup layout and the hierarchies a container's child cgroup goes in:
    hybrid (``name=systemd`` v1 at /sys/fs/cgroup/systemd, cgroup2 at .../unified) or
    unified (cgroup2 at /sys/fs/cgroup); None for anything else."""
    mounts = {}
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, point, kind, options = line.split()[:4]
        mounts[point] = (kind, options)
    if mounts.get("/sys/fs/cgroup", ("",))[0] == "cgroup2":
        return "unified", (Path("/sys/fs/cgroup"),)
    v1 = mounts.get("/sys/fs/cgroup/systemd", ("", ""))
    if v1[0] == "cgroup" and "name=systemd" in v1[1] and mounts.get("/sys/fs/cgroup/unified", ("",))[0] == "cgroup2":
        return "hybrid", (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))
    return None


# Runs on the host as "sh -ec SCRIPT sh CGROUP NETNS LOWER UPPER WORK MERGED [HOST:GUEST]...":
# into the child cgroup first (checked), then the namespaces, then the mounts, then systemd.
BOOT = r"""
cg=$1 netns=$2
for h in $HIERARCHIES; do echo $$ > "$h/$cg/cgroup.procs"; done
grep -q "^0::/$cg\$" /proc/self/cgroup  # in the child (cgroup2; on a hybrid host, both checked)
[ "$LAYOUT" = unified ] || grep -q ":name=systemd:/$cg\$" /proc/self/cgroup
exec nsenter --net="/run/netns/$netns" -- \
    unshare --pid --fork --kill-child --mount --propagation private --uts --ipc --cgroup -- sh -ec '
grep -q "^0::/\$" /proc/self/cgroup  # the container sees the child as its root
R=$6
mount -t overlay overlay -o "lowerdir=$3,upperdir=$4,workdir=$5" "$R"
shift 6
for bind in "$@"; do  # read-only binds of host paths
    mkdir -p "$R/${bind#*:}"
    mount --bind "${bind%%:*}" "$R/${bind#*:}"
    mount -o remount,bind,ro "$R/${bind#*:}"
done
mount -t proc proc "$R/proc"
mount -t sysfs -o ro sysfs "$R/sys"
if [ "$LAYOUT" = unified ]; then
    mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup"
else
    mount -t tmpfs -o mode=755 tmpfs "$R/sys/fs/cgroup"
    mkdir "$R/sys/fs/cgroup/systemd" "$R/sys/fs/cgroup/unified"
    mount -t cgroup -o none,name=systemd cgroup "$R/sys/fs/cgroup/systemd"
    mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup/unified"
fi
mount -t tmpfs -o mode=755 tmpfs "$R/dev"
# Device nodes of its own (never binds of the host nodes: systemd chmods and chowns its
# console, and would do it to the host inode); the console is one more null device.
mknod -m 666 "$R/dev/null" c 1 3
mknod -m 666 "$R/dev/zero" c 1 5
mknod -m 666 "$R/dev/full" c 1 7
mknod -m 666 "$R/dev/random" c 1 8
mknod -m 666 "$R/dev/urandom" c 1 9
mknod -m 666 "$R/dev/tty" c 5 0
mknod -m 600 "$R/dev/console" c 1 3
mkdir "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
mount -t tmpfs tmpfs "$R/dev/shm"
mount -t tmpfs -o mode=755 tmpfs "$R/run"
mount -t tmpfs tmpfs "$R/tmp"
hostname portproxy-test
# The root of this mount namespace becomes the container root: the host tree is not even
# reachable from inside (a chroot would leave it one setns() away).
cd "$R"
mkdir -p .host
pivot_root . .host
exec /usr/sbin/chroot . /bin/sh -ec "umount -l /.host; rmdir /.host
    exec /usr/bin/env -i container=portproxy-test /lib/systemd/systemd"
' sh "$@"
"""

assert BOOT.count("'") == 2, "the inner script is one single-quoted word: no apostrophes in it"


class BootedSystemd:
    """systemd as PID 1 of a container over ``root`` (left unchanged), in network namespace
    ``netns``; ``binds`` maps host paths to paths in the container (read-only)."""

    def __init__(self, root: Path, netns: str, scratch: Path, binds: dict[Path, str] | None = None) -> None:
        self.root, self.netns, self.scratch = root, netns, scratch
        self.binds = binds or {}
        self.cgroup = f"portproxy-test-{uuid.uuid4().hex[:8]}"
        layout = cgroup_layout()
        assert layout is not None, "neither a hybrid nor a unified cgroup layout"
        self.layout, self.hierarchies = layout
        self.upper = scratch / "upper"
        self.proc: subprocess.Popen | None = None
        self.pid = 0  # PID 1 of the container, as the host sees it

    # --- life cycle ----------------------------------------------------------------------
    def boot(self, timeout: float = 60) -> None:
        """Start PID 1 and wait until the boot is done (``is-system-running --wait``)."""
        work, merged = self.scratch / "work", self.scratch / "merged"
        for d in (self.upper, work, merged):
            d.mkdir(parents=True, exist_ok=True)
        for hierarchy in self.hierarchies:
            (hierarchy / self.cgroup).mkdir()
        binds = [f"{host}:{guest}" for host, guest in self.binds.items()]
        log = open(self.scratch / "boot.log", "wb")
        self.proc = subprocess.Popen(["sh", "-ec", BOOT, "sh", self.cgroup, self.netns, str(self.root),
                                      str(self.upper), str(work), str(merged), *binds],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                     env={**os.environ, "LAYOUT": self.layout,
                                          "HIERARCHIES": " ".join(map(str, self.hierarchies))})
        log.close()
        deadline = time.monotonic() + timeout
        # PID 1 up, then its private bus (systemctl's way in) bound.
        while not self.pid or not Path(f"/proc/{self.pid}/root/run/systemd/private").exists():
            self.pid = self.pid or self._find_pid1()
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"systemd did not start: {(self.scratch / 'boot.log').read_text()[-2000:]}")
            time.sleep(0.05)
        state = self.run(["systemctl", "is-system-running", "--wait"], timeout=max(1, deadline - time.monotonic()))
        if state.stdout.strip() != "running":
            failed = self.run(["systemctl", "--failed", "--no-pager"]).stdout
            raise AssertionError(f"system {state.stdout.strip()!r} after boot:\n{failed}")

    def _find_pid1(self) -> int:
        """The unshare's child once it is systemd (before that it is the mounting shell)."""
        assert self.proc is not None
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            for child in children:
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return int(child)
        except (FileNotFoundError, ProcessLookupError):
            pass
        return 0

    def kill(self) -> None:
        """End the container at once (every process in it dies with PID 1), then remove the
        child cgroups. Safe to call twice, and after a failed boot."""
        if self.proc is not None:
            if self.pid:
                try:
                    os.kill(self.pid, 9)
                except ProcessLookupError:
                    pass
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=30)
        for hierarchy in self.hierarchies:
            top = hierarchy / self.cgroup
            deadline = time.monotonic() + 10
            while top.exists():
                try:
                    for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                        d.rmdir()
                    top.rmdir()
                except OSError:  # processes still leaving their cgroup
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        self.pid = 0

    # --- inside --------------------------------------------------------------------------
    def run(self, argv: list[str], timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess:
        """``argv`` in the container: its namespaces, root and working directory."""
        return subprocess.run(["nsenter", "-a", "-r", "-w", "-t", str(self.pid), *argv], input=input,
                              capture_output=True, text=True, timeout=timeout)

    def check(self, argv: list[str], timeout: float = 120, input: str | None = None) -> str:
        result = self.run(argv, timeout, input)
        assert result.returncode == 0, f"{argv}: exit {result.returncode}\n{result.stdout}{result.stderr}"
        return result.stdout

    def sh(self, script: str, timeout: float = 120) -> str:
        return self.check(["/bin/sh", "-ec", script], timeout)

    def systemctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.run(["systemctl", "--no-pager", *args], timeout)

    def show(self, unit: str, prop: str) -> str:
        return self.check(["systemctl", "show", "-P", prop, unit]).strip()

    def main_pid(self, unit: str) -> int:
        """The unit's main process, as a PID inside the container."""
        return int(self.show(unit, "MainPID"))

    def write(self, path: str, text: str) -> None:
        """Write a file inside the container (e.g. a drop-in, a config)."""
        self.check(["/bin/sh", "-ec", 'mkdir -p "$(dirname "$1")"; cat > "$1"', "sh", path], input=text)

    def journal(self, unit: str) -> list[str]:
        return self.check(["journalctl", "--no-pager", "-o", "cat", "-u", unit]).splitlines()

    def signal(self, pid: int, name: str) -> None:
        """Send signal ``name`` (STOP, KILL, ...) to a process of the container."""
        self.check(["/bin/sh", "-c", f"kill -{name} {pid}"])

    def upper_file(self, path: str) -> Path:
        """Where a file the test writes *before* boot goes (the overlay's upper layer)."""
        target = self.upper / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        return target
