"""What turns raw counts into a figure, and refuses to when the thing measured did not happen.

Every figure of the bench is a quotient (bytes per second, CPU per connection, RSS per
connection). A quotient of nothing is not zero: zero connections held through a relay,
zero bytes moved, or a relay that used no CPU while traffic "passed" it mean that the
measurement failed (a tool that delivered nothing, connections that took another way,
a process that was gone). These checks raise :class:`Unmeasured` with the reason, and the
report shows that reason in the cell instead of a number. Pure: no I/O.
"""

from __future__ import annotations


class Unmeasured(RuntimeError):
    """A measurement that did not happen; the message says what was missing."""


SOCKETS_PER_RELAYED_CONNECTION = 2
"""A relay holds the client's connection and its own to the server."""


def held_through_relay(path: str, new_sockets: int, connections: int) -> None:
    """The relay holds a socket pair for every connection said to pass through it.

    Connections can reach the server without the relay: a DNAT rule left behind by a
    kernel-path process that died redirects the port before the relay sees a SYN, and
    the server counts its connections all the same."""
    wanted = SOCKETS_PER_RELAYED_CONNECTION * connections
    if connections <= 0:
        raise Unmeasured(f"{path}: no connection was opened")
    if new_sockets < wanted:
        raise Unmeasured(f"{path}: the relay holds {new_sockets} new sockets for {connections} connections "
                         f"(at least {wanted} expected): the connections did not pass through it")


def per_unit(amount: float, units: float, what: str) -> float:
    """``amount / units``; ``units`` of nothing (or a negative difference) is a failure."""
    if not units > 0:
        raise Unmeasured(f"no {what}: nothing to divide by")
    if amount < 0:
        raise Unmeasured(f"a counter went backwards ({amount:.3g}) over the run")
    return amount / units


def relay_cpu_per_unit(cpu_seconds: float, units: float, what: str, scale: float) -> float:
    """The relay processes' CPU per unit of work (× ``scale``: 1e6 for µs).

    A relay that spent no CPU at all while ``units`` of work passed did not carry it
    (at 100 clock ticks per second, even a one-second quick run of any workload here
    costs a relay many ticks)."""
    value = per_unit(cpu_seconds, units, what)
    if cpu_seconds == 0:
        raise Unmeasured(f"the relay processes used no CPU while {units:.0f} {what} passed: "
                         "the traffic did not pass through them")
    return value * scale


def rss_per_connection_kib(before_kib: int, after_kib: int, connections: int) -> float:
    """RSS growth per held connection; a process gone (RSS 0) is a failure, not a figure."""
    if before_kib <= 0 or after_kib <= 0:
        raise Unmeasured("a relay process was gone when its memory was read")
    if connections <= 0:
        raise Unmeasured("no connection was held")
    if after_kib < before_kib:
        raise Unmeasured(f"RSS shrank ({before_kib} → {after_kib} KiB) while {connections} connections were "
                         "held: something else freed memory meanwhile")
    return (after_kib - before_kib) / connections
