"""Network namespaces owned by this process, for the demo, the benchmark and the tests.

Everything happens inside namespaces made here; the root namespace is never changed
(no links, routes, sysctls or rules). Names are unique per call so parallel or
crashed runs cannot collide.

Two tricks keep callers simple and fast:

* :meth:`Namespace.socket` makes a socket *inside* a namespace from a short-lived
  thread that entered it (setns is per thread), then hands it back: a socket stays
  in the namespace it was created in, so the caller's event loop can use it. Clients
  and servers thus run in-process with no ``ip netns exec``.
* :meth:`Namespace.popen` starts a program inside a namespace (setns after fork).

Netlink calls go through :func:`portproxy.offloop.off_loop` (pyroute2 cannot run on a
thread with a running event loop).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import uuid
from typing import Any, Callable, TypeVar

from pyroute2 import NetNS, netns

from ..offloop import in_fresh_thread, off_loop

T = TypeVar("T")


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Namespace:
    """A named network namespace (``/run/netns/NAME``) owned by this process."""

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    @off_loop
    def create(cls, prefix: str = "pp") -> "Namespace":
        name = unique_name(prefix)
        netns.create(name)
        ns = cls(name)
        try:
            ns.sysctl("net/ipv6/conf/all/accept_dad", "0")
            ns.sysctl("net/ipv6/conf/default/accept_dad", "0")
            with ns.netlink() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        except BaseException:
            ns.remove()
            raise
        return ns

    @off_loop
    def remove(self) -> None:
        with contextlib.suppress(OSError, FileNotFoundError):
            netns.remove(self.name)

    def netlink(self) -> NetNS:
        """An rtnetlink handle inside the namespace (use as a context manager)."""
        return NetNS(self.name)

    # --- running code inside -----------------------------------------------
    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Call ``fn(*args)`` on a thread that has entered this namespace."""
        return in_fresh_thread(fn, *args, enter=lambda: netns.setns(self.name))

    def socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A new socket that lives in this namespace."""
        return self.run(socket.socket, family, kind)

    def sysctl(self, key: str, value: str) -> None:
        """Write /proc/sys/<key> of this namespace."""

        def write() -> None:
            with open(f"/proc/sys/{key}", "w") as f:
                f.write(value)

        self.run(write)

    def popen(self, argv: list[str], fds: dict[int, int] | None = None, **kwargs: Any) -> subprocess.Popen:
        """Start a program inside this namespace.

        ``fds`` maps a child fd number to one of ours (e.g. ``{3: status_pipe, 4: sock}``,
        the way dockerd starts docker-proxy).
        """
        path = f"/run/netns/{self.name}"
        fds = fds or {}

        def enter() -> None:
            fd = os.open(path, os.O_RDONLY)
            netns.setns(fd)
            os.close(fd)
            for target, source in fds.items():
                os.dup2(source, target)  # dup2 clears close-on-exec on the copy
            for source in set(fds.values()) - set(fds):
                os.close(source)  # only the numbered copies stay: fd 3 closed means closed

        if fds:
            kwargs.setdefault("close_fds", True)
            kwargs["pass_fds"] = tuple(kwargs.get("pass_fds", ())) + tuple(fds)
        return subprocess.Popen(argv, preexec_fn=enter, **kwargs)

    def __repr__(self) -> str:
        return f"Namespace({self.name!r})"
