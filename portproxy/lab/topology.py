"""The demo topology: a client, a host with a bridge, a container behind it, in namespaces.

``portproxy demo`` and ``portproxy bench`` build it (and the tests, for their own
namespaces); :func:`demo_topology` removes what it made even when the body raises.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import socket
from typing import Iterator

from pyroute2 import NetNS

from ..offloop import off_loop
from .namespaces import Namespace


def _iface(ipr: NetNS, name: str) -> int:
    return ipr.link_lookup(ifname=name)[0]


def _add_addr(ipr: NetNS, ifname: str, cidr: str) -> None:
    iface = ipaddress.ip_interface(cidr)
    ipr.addr("add", index=_iface(ipr, ifname), address=str(iface.ip), prefixlen=iface.network.prefixlen)


def _up(ipr: NetNS, ifname: str) -> None:
    ipr.link("set", index=_iface(ipr, ifname), state="up")


@dataclasses.dataclass
class DemoTopology:
    """The demo network: a client, a host with a bridge, a container behind it.

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
    """Namespaces added later (more containers, see :func:`plug_container`); removed with the rest."""

    def namespaces(self) -> list[Namespace]:
        return [self.client, self.container, *self.extra, self.host]


def plug_container(topo: DemoTopology, ns: Namespace, ip: str, ip6: str, port: str) -> None:
    """Connect container namespace ``ns`` to the bridge through veth ``port`` (host side), with
    ``ip``/16 and ``ip6``/64 on its eth0 and its default routes through the bridge."""
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
def build_demo_topology(prefix: str = "pp") -> DemoTopology:
    """Create the three namespaces and their links; on any failure remove what was made."""
    made: list[Namespace] = []
    try:
        host = Namespace.create(f"{prefix}-host")
        made.append(host)
        container = Namespace.create(f"{prefix}-ctr")
        made.append(container)
        client = Namespace.create(f"{prefix}-cli")
        made.append(client)
        topo = DemoTopology(host=host, container=container, client=client)
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
        plug_container(topo, container, topo.container_ip, topo.container_ip6, topo.container_port)
        return topo
    except BaseException:
        for ns in made:
            ns.remove()
        raise


@contextlib.contextmanager
def demo_topology(prefix: str = "pp") -> Iterator[DemoTopology]:
    """The demo topology for the duration of a ``with`` block, then removed."""
    topo = build_demo_topology(prefix)
    try:
        yield topo
    finally:
        for ns in topo.namespaces():
            ns.remove()
