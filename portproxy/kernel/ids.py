"""Mapping ids: the number each kernel mapping's nft elements and conntrack marks carry.

One allocator for both tables of a namespace, each with its own range (the daemon's
1-0x7FFF, the CNI plugin's 0x8000-0xFFFF: :data:`~portproxy.kernel.builders.MAX_DAEMON_ID`),
so a flow's conntrack mark names one mapping of either. Pure: the caller says which ids
are taken and turns :class:`IdsExhausted` into its own error.
"""

from __future__ import annotations

from typing import Iterable


class IdsExhausted(ValueError):
    """Fewer ids are free in the range than mappings want one; ``capacity`` is the range's size."""

    def __init__(self, capacity: int) -> None:
        super().__init__(f"at most {capacity} mappings")
        self.capacity = capacity


def allocate_ids(wanted: Iterable[int | None], taken: Iterable[int], first: int, last: int) -> list[int]:
    """One id in ``first..last`` for each entry of ``wanted``, none of them ``taken`` nor twice.

    An entry that names an id (the one a mapping had before a restart, so live flows'
    conntrack marks stay charged to it) gets it if it is in the range and still free
    (the earlier entry wins a tie); every other entry gets the lowest free id, in order."""
    wanted = list(wanted)
    used = set(taken)
    ids: list[int | None] = [None] * len(wanted)
    for i, want in enumerate(wanted):
        if want is not None and first <= want <= last and want not in used:
            ids[i] = want
            used.add(want)
    candidate = first
    for i in range(len(ids)):
        if ids[i] is not None:
            continue
        while candidate in used:
            candidate += 1
        if candidate > last:
            raise IdsExhausted(last - first + 1)
        ids[i] = candidate
        used.add(candidate)
    return ids  # type: ignore[return-value]
