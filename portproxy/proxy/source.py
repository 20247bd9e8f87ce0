"""Transparent mode's data-plane half: connect to the target *from the client's address*.

With ``source = "client"`` the upstream socket (a TCP connection or a UDP flow socket)
gets IP_TRANSPARENT / IPV6_TRANSPARENT and is bound to the client's address and port
before it connects, so the target sees the client as on the kernel path (Envoy's
``original_src``, HAProxy's ``usesrc clientip``, nginx's ``proxy_bind $remote_addr
transparent``). The replies, addressed to the client, must be delivered to this host
rather than forwarded: that is the routing half, :mod:`portproxy.kernel.transparent`.

Some clients cannot be spoofed toward the target; their connection is made from the
host's address as without the option (one log line per mapping and reason, and a
count in ``source_fallbacks``):

* ``loopback`` — 127.0.0.0/8 or ::1: the kernel never sends a loopback source out of
  a real interface;
* ``family`` — an IPv6 client toward an IPv4 target or the reverse (a dual-stack
  listener; an IPv4 client that arrives as ``::ffff:a.b.c.d`` is unmapped first);
* ``hairpin`` — the client *is* the target: it would talk to itself;
* ``same_link`` — the client is on the target's own link (another container on the
  same bridge): the target would answer it directly, past the proxy, and the
  connection would never complete. The link's networks are those of the host
  interface that routes to the target, read once per listener;
* ``bind`` — the kernel refused the bind (e.g. the client uses one of this host's own
  addresses, whose port is taken by the client's own socket).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time

log = logging.getLogger("portproxy.source")

IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = getattr(socket, "IPV6_TRANSPARENT", 75)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_LINK_CACHE_SECONDS = 10.0
_link_cache: dict[str, tuple[float, tuple[Network, ...]]] = {}


def fallback_reason(client_ip: str, target_ip: str, target_links: tuple[Network, ...] = ()) -> tuple[str | None, str]:
    """(why the client cannot be the source toward ``target_ip`` or None, its address to bind).

    Pure: the address comes back unmapped (``::ffff:a.b.c.d`` → ``a.b.c.d``);
    ``target_links`` are the networks on the target's link (see target_link_networks)."""
    addr = ipaddress.ip_address(client_ip.partition("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    target = ipaddress.ip_address(target_ip)
    if addr.is_loopback:
        return "loopback", str(addr)
    if addr.version != target.version:
        return "family", str(addr)
    if addr == target:
        return "hairpin", str(addr)
    if any(addr in net for net in target_links):
        return "same_link", str(addr)
    return None, str(addr)


def target_link_networks(target_ip: str) -> tuple[Network, ...]:
    """The networks of the host interface that routes to ``target_ip`` (netlink, once per
    listener, on a short thread of its own: pyroute2 must not run on the loop's thread).

    Empty when it cannot be read: then only the other fallbacks apply. Kept for
    _LINK_CACHE_SECONDS per target, so a port range (a listener per port) reads it once."""
    cached = _link_cache.get(target_ip)
    if cached is not None and time.monotonic() - cached[0] < _LINK_CACHE_SECONDS:
        return cached[1]
    from ..offloop import off_loop

    @off_loop
    def read() -> tuple[Network, ...]:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            oif = ipr.route("get", dst=target_ip)[0].get_attr("RTA_OIF")
            return tuple(ipaddress.ip_interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}").network
                         for a in ipr.get_addr(index=oif))

    try:
        networks = read()
    except Exception as exc:  # noqa: BLE001 - a netlink failure must not stop the mapping
        if cached is None:  # said once per target, not per port of a range
            log.warning("cannot read the link toward %s (%s): same-link clients will not fall back", target_ip, exc)
        networks = ()
    _link_cache[target_ip] = (time.monotonic(), networks)
    return networks


class ClientSource:
    """Binds one listener's upstream sockets to their clients' addresses."""

    __slots__ = ("_target_ip", "_links", "_name", "_fallbacks", "_warned")

    def __init__(self, target_ip: str, name: str, fallbacks: "dict[str, int]") -> None:
        self._target_ip = target_ip
        self._links = target_link_networks(target_ip)
        self._name = name
        self._fallbacks = fallbacks
        """The listener's ``source_fallbacks`` counter (by reason)."""
        self._warned: set[str] = set()

    def bind(self, up: socket.socket, client: tuple) -> bool:
        """Make ``up`` (not yet connected) leave from ``client``'s address and port.

        False (and the socket left as it was, so it connects from the host) on fallback."""
        reason, ip = fallback_reason(client[0], self._target_ip, self._links)
        if reason is None:
            try:
                if up.family == socket.AF_INET6:
                    up.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
                else:
                    up.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
                up.bind((ip, client[1]))
                return True
            except OSError as exc:
                reason = "bind"
                detail = exc.strerror
        else:
            detail = None
        self._fallbacks[reason] += 1
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("%s: client %s cannot be the source toward the target (%s%s); connecting from the host's "
                        "address (said once per mapping and reason)", self._name, ip, reason,
                        f": {detail}" if detail else "")
        return False
