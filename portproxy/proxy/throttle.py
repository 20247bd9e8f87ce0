"""How often a repeated warning may reach the log: the first at once, then a summary.

A target that is down makes every connection fail the same way; a line per failure
buried the log (hundreds of lines a second) and told nothing the first line had not.
:class:`LogThrottle` decides, without I/O or clocks of its own, which occurrence is
written as it happens and what the summary of the ones held back says. The caller
owns the timer: it arms one for :attr:`LogThrottle.due` whenever :meth:`admit` or
:meth:`summary` opens a window, and calls :meth:`summary` when it fires.

Counters (metrics) are kept by the caller for every occurrence; only lines are held.
"""

from __future__ import annotations

import collections

INTERVAL = 10.0
"""Seconds between lines about one mapping's failed connects, at most."""


class LogThrottle:
    """One warning's window: at most one line (first or summary) per ``interval``."""

    __slots__ = ("interval", "due", "_held")

    def __init__(self, interval: float = INTERVAL) -> None:
        self.interval = interval
        self.due: float | None = None
        """When the open window ends and its summary is due; None while no window is open."""
        self._held: collections.Counter[str] = collections.Counter()

    def admit(self, now: float, reason: str) -> bool:
        """An occurrence at ``now``: True to write its line now (it opens a window ending
        at :attr:`due`), False to hold it for the window's summary."""
        if self.due is None:
            self.due = now + self.interval
            return True
        self._held[reason] += 1
        return False

    def summary(self, now: float) -> dict[str, int]:
        """The window has ended: what was held, by reason (empty: nothing to write).

        A summary is a line too, so when it is not empty a new window opens at ``now``
        (:attr:`due` is set again); when it is empty the next occurrence is written at once."""
        held = dict(self._held)
        self._held.clear()
        self.due = now + self.interval if held else None
        return held

    @property
    def held(self) -> int:
        """Occurrences waiting for the summary."""
        return sum(self._held.values())


def summary_text(held: dict[str, int], seconds: float) -> str:
    """``"12 more in the last 10s (ECONNREFUSED 10, timeout 2)"``: reasons by count, then name."""
    reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(held.items(), key=lambda item: (-item[1], item[0])))
    return f"{sum(held.values())} more in the last {round(seconds, 1):g}s ({reasons})"
