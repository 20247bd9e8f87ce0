"""Serve the exposition over HTTP from a thread of its own (prometheus-client's WSGI server).

The collector reads plain integers the data plane keeps and, for kernel mappings,
the nft counters through libnftables — a blocking call that must never run on the
event loop, which is why the exposition is not an aiohttp handler on that loop.
"""

from __future__ import annotations

import ipaddress

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, start_http_server

from .collector import MappingCollector

DEFAULT_METRICS_ADDR = "127.0.0.1:9779"
"""Loopback only by default: counters name every published port and target."""


def parse_metrics_addr(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` → (host, port); ValueError with a readable message."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    return host, int(port_text)


def start_metrics_server(addr: str, collector: MappingCollector):  # noqa: ANN201 - prometheus types
    """Start the exposition thread; returns (server, thread) so the caller can shut it down."""
    host, port = parse_metrics_addr(addr)
    registry = CollectorRegistry()
    registry.register(collector)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return start_http_server(port, addr=host, registry=registry)
