"""Per-mapping counters kept as plain integers on the data plane.

The relay adds to these attributes directly: no locks, no metric objects, nothing
but an integer add per chunk. The metrics layer reads them at scrape time.
"""

from __future__ import annotations

import bisect
import collections

CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Upper bounds (seconds) of the connect-latency histogram; the last bucket is +Inf."""


TO_TARGET = 0
TO_CLIENT = 1


class TcpStats:
    """Counters of one TCP listener (one host port of a mapping)."""

    __slots__ = (
        "accepted",
        "active",
        "bytes",
        "connect_failures",
        "accept_errors",
        "connect_seconds_sum",
        "connect_buckets",
        "source_fallbacks",
    )

    def __init__(self) -> None:
        self.accepted = 0
        self.active = 0
        self.bytes = [0, 0]
        """Bytes relayed: [TO_TARGET] client → target, [TO_CLIENT] target → client."""
        self.connect_failures: collections.Counter[str] = collections.Counter()
        self.accept_errors: collections.Counter[str] = collections.Counter()
        self.connect_seconds_sum = 0.0
        self.connect_buckets = [0] * (len(CONNECT_BUCKETS) + 1)
        """Non-cumulative counts per bucket of CONNECT_BUCKETS, then +Inf."""
        self.source_fallbacks: collections.Counter[str] = collections.Counter()
        """Transparent mode: connections made from the host's address instead, by reason."""

    def record_connect(self, seconds: float) -> None:
        """Once per connection (not per chunk): a bisect and two adds."""
        self.connect_seconds_sum += seconds
        self.connect_buckets[bisect.bisect_left(CONNECT_BUCKETS, seconds)] += 1


class UdpStats:
    """Counters of one UDP listener."""

    __slots__ = (
        "flows_active",
        "flows_created",
        "flows_expired",
        "flows_evicted",
        "datagrams_to_target",
        "datagrams_to_client",
        "bytes_to_target",
        "bytes_to_client",
        "send_errors",
        "source_fallbacks",
    )

    def __init__(self) -> None:
        self.flows_active = 0
        self.flows_created = 0
        self.flows_expired = 0
        self.flows_evicted = 0
        self.datagrams_to_target = 0
        self.datagrams_to_client = 0
        self.bytes_to_target = 0
        self.bytes_to_client = 0
        self.send_errors: collections.Counter[str] = collections.Counter()
        self.source_fallbacks: collections.Counter[str] = collections.Counter()
        """Transparent mode: flows opened from the host's address instead, by reason."""
