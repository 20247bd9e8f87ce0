"""CPU time, resident memory and open sockets of the relaying processes, and the TCP default,
read from /proc."""

from __future__ import annotations

import os
from pathlib import Path


def _tree(pids: list[int]) -> set[int]:
    """These processes and every live descendant (socat forks per connection)."""
    return {p for pid in pids for p in (pid, *descendants(pid))}


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes and their live descendants so far, reaped
    children included (socat's per-connection children are charged to their parent once
    they exit, and counted as themselves while they live: a child reaped between two
    readings moves from one term to the other, so a difference of two readings is exact)."""
    total = 0
    for pid in _tree(pids):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return total / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU-seconds the whole machine has spent busy so far, summed over every CPU: user,
    nice, system, irq and softirq of /proc/stat (not idle, iowait or steal).

    The kernel path has no process to charge: its NAT and forwarding run in softirq
    context, on whichever CPU the packet is, often inside the load generator's own
    syscalls. Only the whole machine sees that cost (and everything else it runs)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def socket_count(pids: list[int]) -> int:
    """Sockets held open by these processes and their live descendants (each counted once)."""
    seen: set[str] = set()
    for pid in _tree(pids):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:"):
                seen.add(link)
    return len(seen)


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
