"""CPU time and resident memory of the relaying processes, and the TCP default, read from /proc."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes so far, their reaped children included
    (socat's per-connection children are charged to their parent once they exit)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return total / os.sysconf("SC_CLK_TCK")


def _kib_field(path: str, key: str) -> int:
    """A ``Key:  N kB`` line of a /proc file, 0 once the process is gone."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pid: int) -> int:
    """VmRSS of one process, 0 once it is gone."""
    return _kib_field(f"/proc/{pid}/status", "VmRSS:")


def pss_kib(pid: int) -> int:
    """Proportional set size of one process (shared pages divided among their users), 0 once gone."""
    return _kib_field(f"/proc/{pid}/smaps_rollup", "Pss:")


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def rss_tree_kib(pids: list[int]) -> int:
    """RSS of these processes and all their descendants (socat forks per connection)."""
    return sum(rss_kib(p) for pid in pids for p in (pid, *descendants(pid)))


def default_congestion_control() -> str:
    """The machine's TCP congestion control; new namespaces (the benchmark's) take it over."""
    try:
        return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    except OSError:
        return "unknown"
