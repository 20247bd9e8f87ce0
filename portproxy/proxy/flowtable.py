"""The UDP flow table: flows by client address, in least-recently-active order.

Plain data, no sockets and no clock: the caller passes the time, so expiry and
eviction are tested without root and without waiting (tests/test_flowtable.py).
Keeping the flows in least-recently-active order gives both idle expiry and eviction
of the least recently active flow when the table is full in O(1) per datagram.
"""

from __future__ import annotations

import collections
from typing import Callable, Generic, Hashable, Iterator, Protocol, TypeVar


class Timed(Protocol):
    last: float
    """When the flow last carried a datagram, either way."""


F = TypeVar("F", bound=Timed)


class FlowTable(Generic[F]):
    """At most ``max_flows`` flows; a flow idle for ``timeout`` seconds expires."""

    __slots__ = ("max_flows", "timeout", "_flows", "get")

    def __init__(self, max_flows: int, timeout: float) -> None:
        if max_flows < 1:
            raise ValueError(f"max_flows must be at least 1, not {max_flows}")
        if not timeout > 0:
            raise ValueError(f"a flow timeout must be above 0, not {timeout}")
        self.max_flows = max_flows
        self.timeout = timeout
        self._flows: collections.OrderedDict[Hashable, F] = collections.OrderedDict()
        self.get: Callable[[Hashable], F | None] = self._flows.get
        """The flow of a key, or None: the dict's own method, once per datagram."""

    def __len__(self) -> int:
        return len(self._flows)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._flows

    def __iter__(self) -> Iterator[F]:
        """Least recently active first."""
        return iter(list(self._flows.values()))

    def touch(self, key: Hashable, now: float) -> None:
        """The flow carried a datagram at ``now`` (a flow no longer in the table is ignored)."""
        flow = self._flows.get(key)
        if flow is not None:
            flow.last = now
            self._flows.move_to_end(key)

    def evict_if_full(self) -> F | None:
        """Make room for one more flow: remove and return the least recently active one
        if the table is full. Called before the new flow's socket is made, so a full
        table frees a descriptor first."""
        if len(self._flows) < self.max_flows:
            return None
        return self._flows.popitem(last=False)[1]

    def add(self, key: Hashable, flow: F, now: float) -> None:
        """Insert a new flow (call :meth:`evict_if_full` first)."""
        assert key not in self._flows and len(self._flows) < self.max_flows
        flow.last = now
        self._flows[key] = flow

    def expire(self, now: float) -> list[F]:
        """Remove and return the flows idle since ``now - timeout`` or longer."""
        deadline = now - self.timeout
        flows = self._flows
        expired: list[F] = []
        while flows:
            key, flow = next(iter(flows.items()))
            if flow.last > deadline:
                break
            del flows[key]
            expired.append(flow)
        return expired

    def clear(self) -> list[F]:
        """Remove and return every flow."""
        flows = list(self._flows.values())
        self._flows.clear()
        return flows
