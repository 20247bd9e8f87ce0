"""Tunables of the userland data plane, shared by every mapping of one process."""

from __future__ import annotations

import dataclasses
import errno
import math
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
    target_rcvbuf: int = 32 * 1024
    """SO_RCVBUF of the socket to the target until the client has shown that it reads
    (acknowledged its first MiB); then it gets what autotuning could grow it to. 0:
    autotuning from the start. Autotuned, a client that never reads let the target
    fill ~4 MB per connection, all pinned kernel memory."""
    notsent_lowat: int = 16 * 1024
    """TCP_NOTSENT_LOWAT of the client's socket (0: off): at most this much unsent data
    waits in its send queue; what is in flight is not limited, so a long client path
    still fills its window, but a client that stops reading holds little here."""

    proxy_protocol: str | None = None
    """"v1" or "v2": write a PROXY protocol header with the client's address on each TCP
    connection to the target, before any payload (see proxy_protocol); None: no header."""
    source: str = "host"
    """"host": connect to the target from this host's address; "client": from the
    client's address and port (transparent mode, see source; needs the routing of
    portproxy.kernel.transparent installed while such a mapping runs)."""

    def __post_init__(self) -> None:
        """The last line of defence: values that break the data plane never get this far
        (the options schema refuses them first), but if they do, one line says which."""
        checks = (
            ("connect_timeout", math.isfinite(self.connect_timeout) and self.connect_timeout > 0, "a finite number above 0"),
            ("udp_timeout", math.isfinite(self.udp_timeout) and self.udp_timeout > 0, "a finite number above 0"),
            ("max_udp_flows", self.max_udp_flows >= 1, "at least 1"),
            ("drain_timeout", math.isfinite(self.drain_timeout) and self.drain_timeout >= 0, "a finite number, 0 or more"),
            ("pipe_size", self.pipe_size >= 4096, "at least 4096 (one page)"),
            ("pipe_pool_max", self.pipe_pool_max >= 0, "0 or more"),
            ("listen_backlog", self.listen_backlog >= 1, "at least 1"),
            ("target_rcvbuf", self.target_rcvbuf >= 0, "0 or more"),
            ("notsent_lowat", self.notsent_lowat >= 0, "0 or more"),
        )
        for name, ok, wanted in checks:
            if not ok:
                raise ValueError(f"{name} must be {wanted}, not {getattr(self, name)!r}")


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
