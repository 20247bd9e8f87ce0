"""The benchmark network: the demo topology with the sysctls that keep the figures honest.

Everything is set inside the benchmark's own namespaces; the root namespace is
never touched. Connection-rate runs are the ones that need care: each short
connection leaves a TIME_WAIT socket and a conntrack entry behind.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from ..kernel import conntrack
from ..lab.topology import DemoTopology, demo_topology


EPHEMERAL_LOW = 32768
"""Published ports in the benchmark stay below this."""


def tune(topo: DemoTopology) -> None:
    """Per-namespace sysctls that would otherwise distort the figures."""
    for ns in topo.namespaces():
        # Ephemeral ports from 32768 up, so the published ports (below it) never collide
        # with a connection's local port; still ~32k ports for short-connection runs.
        ns.sysctl("net/ipv4/ip_local_port_range", f"{EPHEMERAL_LOW} 65000")
        ns.sysctl("net/ipv4/tcp_tw_reuse", "1")
        ns.sysctl("net/core/somaxconn", "8192")
    # The server's TIME_WAIT sockets would collide with the next path's reused client
    # ports (SYNs to a TIME_WAIT socket are answered with a challenge ACK, and the
    # client retries after a second): DNAT read 3k connections/s instead of 17k/s.
    topo.container.sysctl("net/ipv4/tcp_max_tw_buckets", "1024")


def reset_conntrack(topo: DemoTopology) -> None:
    """Empty conntrack in every benchmark namespace before a run.

    Short-connection runs leave an entry per connection (TIME_WAIT entries live
    120 s); a table filling up makes the next path's rate collapse, which would be
    charged to the wrong path."""
    for ns in topo.namespaces():
        ns.run(conntrack.flush)


@contextlib.contextmanager
def bench_topology(prefix: str = "ppbench") -> Iterator[DemoTopology]:
    """Build, tune, hand over, and always tear down."""
    with demo_topology(prefix) as topo:
        tune(topo)
        yield topo
