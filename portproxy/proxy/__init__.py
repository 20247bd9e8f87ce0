"""The userland data plane: TCP relays (splice or copy) and a UDP flow table, on one event loop.

The split follows asyncio's own: readiness callbacks on raw non-blocking sockets
(:mod:`.pump`, :mod:`.splice`, :mod:`.copy`) move bytes; :mod:`.tcp` and :mod:`.udp`
own connection and flow life cycles; :mod:`.server` runs a set of mappings.
"""

from .options import ProxyOptions
from .server import ProxyServer

__all__ = ["ProxyOptions", "ProxyServer"]
