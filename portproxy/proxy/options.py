"""Tunables of the userland data plane, shared by every mapping of one process."""

from __future__ import annotations

import dataclasses
import errno
import os
import socket


@dataclasses.dataclass(frozen=True)
class ProxyOptions:
    connect_timeout: float = 5.0
    """Seconds to wait for the target to accept a TCP connection."""
    udp_timeout: float = 90.0
    """Idle seconds before a UDP flow is forgotten (docker-proxy's UDPConnTrackTimeout)."""
    max_udp_flows: int = 4096
    """Flows per UDP listener; past it the least recently active flow is evicted."""
    drain_timeout: float = 10.0
    """Seconds a graceful stop waits for live connections before closing them."""
    splice: bool = True
    """Relay TCP with os.splice through pooled pipes; False uses a recv/send copy."""
    pipe_size: int = 1024 * 1024
    """Bytes per splice pipe (F_SETPIPE_SZ); one read never moves more than this."""
    pipe_pool_max: int = 256
    """Idle pipes kept for reuse; pipes beyond this are closed when returned."""
    listen_backlog: int = 4096
    target_cc: str | None = None
    """TCP congestion control for the connections to the target (TCP_CONGESTION);
    None keeps the system default. A target on a local bridge has no bottleneck to
    probe: on a host whose default is bbr, "cubic" spares that leg bbr's pacing."""
    proxy_protocol: str | None = None
    """"v1" or "v2": write a PROXY protocol header with the client's address on each TCP
    connection to the target, before any payload (see proxy_protocol); None: no header."""
    source: str = "host"
    """"host": connect to the target from this host's address; "client": from the
    client's address and port (transparent mode, see source; needs the routing of
    portproxy.kernel.transparent installed while such a mapping runs)."""


def congestion_control_error(name: str) -> str | None:
    """Why ``name`` cannot be used as a socket's congestion control, or None if it can.

    Asked once at start, on a throw-away socket, so a typo is one clear line and not a
    failure per connection."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode())
    except OSError as exc:
        why = "not available (see /proc/sys/net/ipv4/tcp_available_congestion_control)" \
            if exc.errno == errno.ENOENT else os.strerror(exc.errno or 0)
        return f"TCP congestion control {name!r}: {why}"
    finally:
        probe.close()
    return None
