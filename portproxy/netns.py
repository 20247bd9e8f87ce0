"""Network-namespace topologies built with pyroute2, shared by the demo, tests and benchmarks.

Everything here happens inside namespaces this module creates; the root namespace
is never changed (no links, routes, sysctls or rules). Names are unique per call
so parallel or crashed runs cannot collide, and :func:`seed_topology` removes what
it made even when the body raises.

Two tricks keep callers simple and fast:

* :meth:`Namespace.socket` makes a socket *inside* a namespace from a short-lived
  thread that entered it (setns is per thread), then hands it back: a socket stays
  in the namespace it was created in, so the caller's event loop can use it. Test
  clients and servers thus run in-process with no ``ip netns exec``.
* :meth:`Namespace.popen` starts a program inside a namespace (setns after fork).

pyroute2's synchronous API cannot run on a thread whose event loop is running (and
never on uvloop, pyroute2#1335), so every netlink call here goes through
:func:`portproxy.offloop.off_loop`, which moves it to a short-lived plain thread when needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import socket
import subprocess
import uuid
from typing import Any, Callable, Iterator, TypeVar

from pyroute2 import NetNS, netns

from .offloop import in_fresh_thread, off_loop

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

    def read_sysctl(self, key: str) -> str:
        def read() -> str:
            with open(f"/proc/sys/{key}") as f:
                return f.read().strip()

        return self.run(read)

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


def _iface(ipr: NetNS, name: str) -> int:
    return ipr.link_lookup(ifname=name)[0]


def _add_addr(ipr: NetNS, ifname: str, cidr: str) -> None:
    iface = ipaddress.ip_interface(cidr)
    ipr.addr("add", index=_iface(ipr, ifname), address=str(iface.ip), prefixlen=iface.network.prefixlen)


def _up(ipr: NetNS, ifname: str) -> None:
    ipr.link("set", index=_iface(ipr, ifname), state="up")


@dataclasses.dataclass
class SeedTopology:
    """The seeds' demo network: a client, a host with a bridge, a container behind it.

    ::

        client ns                host ns                         container ns
        198.51.100.2/24 --veth-- 198.51.100.1/24
        fd00:198:51::2/64        fd00:198:51::1/64
                                 br0 172.16.1.254/16 --veth----- eth0 172.16.1.1/16
                                     fd00:172:16::fe/64          fd00:172:16::1/64

    The host forwards between the two (ip_forward inside its own namespace); the
    container and the client route through it by default.
    """

    host: Namespace
    container: Namespace
    client: Namespace
    bridge: str = "br0"
    bridge_ip: str = "172.16.1.254"
    container_ip: str = "172.16.1.1"
    container_ip6: str = "fd00:172:16::1"
    bridge_ip6: str = "fd00:172:16::fe"
    client_ip: str = "198.51.100.2"
    client_ip6: str = "fd00:198:51::2"
    host_ip: str = "198.51.100.1"
    host_ip6: str = "fd00:198:51::1"
    container_port: str = "vc0"
    """The host-side veth of the container, a port of the bridge."""
    extra: list[Namespace] = dataclasses.field(default_factory=list)
    """Namespaces added later (more containers); removed with the rest."""

    def namespaces(self) -> list[Namespace]:
        return [self.client, self.container, *self.extra, self.host]

    @off_loop
    def add_container(self, name_prefix: str, ip: str, ip6: str, port: str) -> Namespace:
        """Plug one more container into the bridge (for hairpin and multi-target cases)."""
        ns = Namespace.create(name_prefix)
        self.extra.append(ns)
        _plug_container(self, ns, ip, ip6, port)
        return ns


def _plug_container(topo: SeedTopology, ns: Namespace, ip: str, ip6: str, port: str) -> None:
    with topo.host.netlink() as ipr:
        ipr.link("add", ifname=port, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns.name})
        ipr.link("set", index=_iface(ipr, port), master=_iface(ipr, topo.bridge), state="up")
    with ns.netlink() as ipr:
        _add_addr(ipr, "eth0", f"{ip}/16")
        _add_addr(ipr, "eth0", f"{ip6}/64")
        _up(ipr, "eth0")
        ipr.route("add", dst="0.0.0.0/0", gateway=topo.bridge_ip)
        ipr.route("add", dst="::/0", gateway=topo.bridge_ip6, family=socket.AF_INET6)


@off_loop
def build_seed_topology(prefix: str = "pp") -> SeedTopology:
    """Create the three namespaces and their links; on any failure remove what was made."""
    made: list[Namespace] = []
    try:
        host = Namespace.create(f"{prefix}-host")
        made.append(host)
        container = Namespace.create(f"{prefix}-ctr")
        made.append(container)
        client = Namespace.create(f"{prefix}-cli")
        made.append(client)
        topo = SeedTopology(host=host, container=container, client=client)
        host.sysctl("net/ipv4/ip_forward", "1")
        host.sysctl("net/ipv6/conf/all/forwarding", "1")
        with host.netlink() as ipr:
            ipr.link("add", ifname=topo.bridge, kind="bridge")
            _add_addr(ipr, topo.bridge, f"{topo.bridge_ip}/16")
            _add_addr(ipr, topo.bridge, f"{topo.bridge_ip6}/64")
            _up(ipr, topo.bridge)
            ipr.link("add", ifname="vout", kind="veth", peer={"ifname": "eth0", "net_ns_fd": client.name})
            _add_addr(ipr, "vout", f"{topo.host_ip}/24")
            _add_addr(ipr, "vout", f"{topo.host_ip6}/64")
            _up(ipr, "vout")
        with client.netlink() as ipr:
            _add_addr(ipr, "eth0", f"{topo.client_ip}/24")
            _add_addr(ipr, "eth0", f"{topo.client_ip6}/64")
            _up(ipr, "eth0")
            ipr.route("add", dst="0.0.0.0/0", gateway=topo.host_ip)
            ipr.route("add", dst="::/0", gateway=topo.host_ip6, family=socket.AF_INET6)
        _plug_container(topo, container, topo.container_ip, topo.container_ip6, topo.container_port)
        return topo
    except BaseException:
        for ns in made:
            ns.remove()
        raise


@contextlib.contextmanager
def seed_topology(prefix: str = "pp") -> Iterator[SeedTopology]:
    """Build the seeds' topology for the duration of a ``with`` block, then remove it."""
    topo = build_seed_topology(prefix)
    try:
        yield topo
    finally:
        for ns in topo.namespaces():
            ns.remove()
