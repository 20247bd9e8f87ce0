"""What the server asks of the listener of one host port, TCP or UDP alike.

A listener owns one bound socket and is in one of three states:

* **serving** — taking new connections (TCP) or datagrams (UDP);
* **held** — not serving, but the port stays bound and *exclusive*: no other socket
  on the host can bind it, with or without SO_REUSEADDR / SO_REUSEPORT, so a port
  portproxy gave to the kernel path cannot be taken while it is away;
* **closed** — the port is released (an adopted socket is left to its owner).

Connections already relayed are not part of the state: they run on through hold and
close, and :attr:`open_connections` tells a graceful stop how many it still waits for.
"""

from __future__ import annotations

import abc
import socket

from .stats import TcpStats, UdpStats


class Listener(abc.ABC):
    sock: socket.socket
    name: str
    stats: TcpStats | UdpStats
    owned: bool
    """False for an adopted socket (socket activation): its supervisor holds a copy, so
    it is never closed here, only left listening the way it was handed over."""

    @property
    @abc.abstractmethod
    def serving(self) -> bool:
        """True while new traffic is taken."""

    @abc.abstractmethod
    def serve(self) -> None:
        """Start or resume taking traffic (idempotent); OSError if the socket cannot."""

    @abc.abstractmethod
    def hold(self) -> None:
        """Stop taking traffic but keep the port bound and exclusive (idempotent).
        What is already queued for the listener is relayed first, not dropped."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the port; live TCP connections run to their end, UDP flows end now."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Reset whatever connections are still open (the end of a drain)."""

    @property
    @abc.abstractmethod
    def open_connections(self) -> int:
        """Connections that outlive :meth:`close` and that a graceful stop waits for
        (TCP connections; UDP has none: its flows end with the listener)."""
