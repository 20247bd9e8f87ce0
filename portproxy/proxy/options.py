"""Tunables of the userland data plane, shared by every mapping of one process."""

from __future__ import annotations

import dataclasses


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

