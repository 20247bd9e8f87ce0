"""``mode = "auto"``: a mapping that moves itself between the paths (pure: no I/O, no clock).

An auto mapping serves on the userland path while it is light. When its load — bytes
per second through it, or new connections per second — stays at or above a threshold
for ``hot_after`` seconds, it moves to the kernel path; it moves back only after it has
stayed below a fraction of both thresholds for ``cool_after`` seconds (a minute by
default), so a burst does not flap it. The move itself is the controller's ordinary
live switch, make before break: connections the proxy already relays finish on the
userland path, new ones are translated.

"The kernel path" of an auto mapping is ``hybrid``: the DNAT serves what it can, and the
mapping's listener keeps serving what DNAT cannot (a loopback client, an IPv6 client of
an IPv4 target), exactly as the userland path served them. So every client reaches the
mapping in both places; what changes is who moves the bytes.

The policy sees only samples of monotonic counters (the mapping's userland and kernel
totals added up, so traffic that stays on the proxy after a move still counts) and the
time they were taken; :meth:`AutoPolicy.observe` answers where the mapping should be.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Place = Literal["userland", "hybrid"]
"""Where an auto mapping is: light on the proxy, or hot on DNAT (with the proxy behind)."""

COOL, HOT = "userland", "hybrid"


@dataclasses.dataclass(frozen=True)
class AutoThresholds:
    """When an auto mapping moves. Defaults: ~160 Mbit/s or 200 new connections/s for a
    second moves it to the kernel; under half of both for a minute moves it back."""

    bytes_per_second: float = 20e6
    connections_per_second: float = 200.0
    hot_after: float = 1.0
    """Seconds of load at or above a threshold before the move to the kernel path."""
    cool_after: float = 60.0
    """Seconds of load below ``cool_fraction`` of both thresholds before the move back."""
    cool_fraction: float = 0.5


@dataclasses.dataclass(frozen=True)
class Sample:
    """The mapping's counters at one moment: bytes both ways, connections (or flows) made."""

    time: float
    bytes: int
    connections: int


@dataclasses.dataclass(frozen=True)
class Load:
    bytes_per_second: float
    connections_per_second: float


@dataclasses.dataclass
class AutoPolicy:
    """One auto mapping's state: where it is, and since when its load has said otherwise."""

    thresholds: AutoThresholds = dataclasses.field(default_factory=AutoThresholds)
    place: Place = COOL
    moves: int = 0
    last: Sample | None = None
    load: Load | None = None
    """The load between the last two samples (for ``ls`` and the metrics)."""
    _since: float | None = None
    """When the load first said "move" without a break since (None: it does not)."""

    def observe(self, sample: Sample) -> Place | None:
        """Take a sample; the place to move to now, or None to stay.

        A counter that went backwards (the mapping was replaced) restarts the
        measurement rather than reading as negative load."""
        previous, self.last = self.last, sample
        if previous is None or sample.time <= previous.time or sample.bytes < previous.bytes \
                or sample.connections < previous.connections:
            self._since = None
            return None
        elapsed = sample.time - previous.time
        self.load = Load((sample.bytes - previous.bytes) / elapsed,
                         (sample.connections - previous.connections) / elapsed)
        if not self._wants_to_move(self.load):
            self._since = None
            return None
        if self._since is None:
            self._since = previous.time
        wait = self.thresholds.hot_after if self.place == COOL else self.thresholds.cool_after
        if sample.time - self._since < wait:
            return None
        return HOT if self.place == COOL else COOL

    def moved(self, place: Place) -> None:
        """The move to ``place`` is done (or, on a failed move, call nothing: it is asked again)."""
        self.place = place
        self.moves += 1
        self._since = None

    def _wants_to_move(self, load: Load) -> bool:
        t = self.thresholds
        if self.place == COOL:
            return load.bytes_per_second >= t.bytes_per_second or load.connections_per_second >= t.connections_per_second
        return (load.bytes_per_second < t.cool_fraction * t.bytes_per_second
                and load.connections_per_second < t.cool_fraction * t.connections_per_second)
