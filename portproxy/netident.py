"""Which network namespace: this thread's, a socket's, a process's.

Two forms, for two uses:

* :func:`netns_id` names this thread's namespace in file names that outlive a process
  (the nft table's lock): the namespace cookie (Linux 5.14+), unique until reboot, else the
  nsfs inode. Not the inode first: inodes are reused once a namespace is gone, and a lock
  left by a process of a deleted namespace would then refuse a new, unrelated one.
* :class:`Netns` (the nsfs device and inode) compares namespaces that are alive at the
  time of the comparison, where inodes are unique: :func:`in_own_netns` answers "does this
  socket, or this process, live in my namespace" for the delegate socket (the daemon
  serves only its own namespace's ports) and the CNI plugin (a daemon of another
  namespace has its table elsewhere).

Always of the calling *thread* (``/proc/thread-self``): setns is per thread, and a worker
that entered a namespace asks about that one. Lean on purpose (the CNI plugin starts for
every container): os and socket only, fcntl when a socket's namespace is asked for.
"""

from __future__ import annotations

import os
import socket
import sys

SO_NETNS_COOKIE = getattr(socket, "SO_NETNS_COOKIE", 71)
SIOCGSKNS = 0x894C
"""ioctl: an fd of the network namespace a socket lives in (Linux 4.9; needs CAP_NET_ADMIN)."""

Netns = tuple[int, int]
"""(st_dev, st_ino) of a namespace's nsfs file: equal for one live namespace, and only for it."""


def netns_id() -> str:
    """This thread's network namespace as a name part: ``c<cookie>``, else ``i<inode>``."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            return "c" + str(int.from_bytes(probe.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), sys.byteorder))
        except OSError:
            return "i" + str(os.stat("/proc/thread-self/ns/net").st_ino)


def own_netns() -> Netns:
    """This thread's network namespace."""
    return _key(os.stat("/proc/thread-self/ns/net"))


def netns_of_pid(pid: int) -> Netns:
    """Process ``pid``'s network namespace (that of its main thread); OSError if it cannot be read."""
    return _key(os.stat(f"/proc/{pid}/ns/net"))


def netns_of_socket(sock: socket.socket) -> Netns:
    """The network namespace ``sock`` lives in (SIOCGSKNS); OSError without CAP_NET_ADMIN."""
    import fcntl

    fd = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
    try:
        return _key(os.fstat(fd))
    finally:
        os.close(fd)


def in_own_netns(sock: socket.socket | None = None, pid: int | None = None) -> bool:
    """Whether ``sock`` lives in this thread's network namespace, or, when its namespace
    cannot be read (or no socket is given), whether process ``pid`` does (the one that sent
    or holds it stands in for it). OSError when neither can be told."""
    theirs: Netns | None = None
    error: OSError | None = None
    if sock is not None:
        try:
            theirs = netns_of_socket(sock)
        except OSError as exc:
            error = exc
    if theirs is None:
        if pid is None or pid <= 0:  # 0: a peer outside this pid namespace
            raise error or OSError("no socket and no process to tell the network namespace by")
        theirs = netns_of_pid(pid)
    return theirs == own_netns()


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket (SO_PEERCRED); the pid
    is 0 for a peer outside this pid namespace."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    pid, uid, gid = (int.from_bytes(data[i:i + 4], sys.byteorder, signed=True) for i in (0, 4, 8))
    return pid, uid, gid


def _key(st: os.stat_result) -> Netns:
    return st.st_dev, st.st_ino
