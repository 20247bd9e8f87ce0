"""Hairpin through a Linux bridge: let a container reach its own published port.

With br_netfilter active, a DNAT'd packet from a container to its own published
port is turned around at layer 2 and sent out of the bridge port it came in on;
the bridge drops that unless the port is in hairpin mode. Docker enables hairpin
mode on its bridge ports when it runs without the userland proxy; portproxy does
the same for the bridge that routes to a kernel mapping's target, through netlink.
"""

from __future__ import annotations

import logging
import socket

from ..errors import SystemFailure
from ..spec import Mapping

log = logging.getLogger("portproxy.kernel")


class HairpinError(SystemFailure):
    """Hairpin mode could not be set; the message is one line."""


def _bridge_of_target(ipr, target: str, family: int) -> int | None:
    """ifindex of the bridge the route to ``target`` leaves through, or None."""
    try:
        routes = ipr.route("get", dst=target, family=family)
    except Exception:  # noqa: BLE001 - no route: nothing to do here
        return None
    for route in routes:
        oif = route.get_attr("RTA_OIF")
        if oif is None:
            continue
        link = ipr.link("get", index=oif)[0]
        info = link.get_attr("IFLA_LINKINFO")
        if info is not None and info.get_attr("IFLA_INFO_KIND") == "bridge":
            return oif
    return None


def _hairpin_on(ipr, index: int) -> bool:
    for link in ipr.brport("show", index=index):
        protinfo = link.get_attr("IFLA_PROTINFO")
        if protinfo is not None and protinfo.get_attr("IFLA_BRPORT_MODE"):
            return True
    return False


def enable_for(mappings: list[Mapping]) -> list[str]:
    """Turn hairpin mode on for every port of each bridge that routes to a target.

    Returns the names of the ports changed. Blocking netlink calls; call off the loop.
    """
    from pyroute2 import IPRoute

    changed: list[str] = []
    with IPRoute() as ipr:
        bridges: dict[int, str] = {}
        # One route lookup per target, not per mapping: a container's ports share one.
        for target in dict.fromkeys(m.target_ip for m in mappings):
            family = socket.AF_INET if target.version == 4 else socket.AF_INET6
            bridge = _bridge_of_target(ipr, str(target), family)
            if bridge is not None:
                bridges[bridge] = ipr.link("get", index=bridge)[0].get_attr("IFLA_IFNAME")
        for bridge, bridge_name in bridges.items():
            changed_here: list[str] = []
            for port in ipr.get_links(master=bridge):
                if _hairpin_on(ipr, port["index"]):
                    continue
                name = port.get_attr("IFLA_IFNAME")
                try:
                    ipr.brport("set", index=port["index"], mode=1)
                except Exception as exc:  # noqa: BLE001 - reported as one line
                    raise HairpinError(f"cannot enable hairpin mode on bridge port {name}: {exc}") from None
                changed_here.append(name)
            if changed_here:
                log.info("hairpin mode enabled on %s port(s) %s so targets can reach their own published ports",
                         bridge_name, ", ".join(changed_here))
            changed += changed_here
    return changed
