"""Serve the exposition over HTTP from a thread of its own (prometheus-client's WSGI app).

The collector reads plain integers the data plane keeps and, for kernel mappings,
the nft counters through libnftables — a blocking call that must never run on the
event loop, which is why the exposition is not an aiohttp handler on that loop.
"""

from __future__ import annotations

import ipaddress
import socket
import socketserver
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, make_wsgi_app

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


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - wsgiref's naming
        pass


def start_metrics_server(addr: str, collector: MappingCollector) -> tuple[WSGIServer, threading.Thread]:
    """Start the exposition thread; returns (server, thread) so the caller can shut it down.

    The server is built here from ``make_wsgi_app`` rather than with ``start_http_server``,
    which returns nothing before prometheus-client 0.17 (Debian 12 ships 0.16).
    """
    host, port = parse_metrics_addr(addr)
    registry = CollectorRegistry()
    registry.register(collector)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    server_class = _Server6 if ":" in host else _Server
    server = make_server(host, port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    return server, thread
