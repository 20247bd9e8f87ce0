"""The one mapping-id allocator (portproxy.kernel.ids), as both tables use it. No root."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from portproxy.kernel.builders import MAX_DAEMON_ID, MAX_MAPPING_ID
from portproxy.kernel.ids import IdsExhausted, allocate_ids


@pytest.mark.parametrize("wanted, taken, first, last, expected", [
    ([], [], 1, 5, []),
    ([None, None, None], [], 1, 5, [1, 2, 3]),
    ([None, None], [1, 3], 1, 5, [2, 4]),
    ([4, None, None], [], 1, 5, [4, 1, 2]),  # a preferred id first, then the lowest free ones
    ([None, 1], [], 1, 5, [2, 1]),  # the preferred id is kept even when an earlier entry could take it
    ([3, 3], [], 1, 5, [3, 1]),  # one id once: the earlier entry wins
    ([2, 0, 6], [2], 1, 5, [1, 3, 4]),  # taken or outside the range: as if none was named
    ([None, None], [], 0x8000, 0xFFFF, [0x8000, 0x8001]),  # the CNI plugin's range
])
def test_allocation(wanted, taken, first, last, expected) -> None:
    assert allocate_ids(wanted, taken, first, last) == expected


def test_a_full_range_says_its_size() -> None:
    assert allocate_ids([None], [1, 2, 4], 1, 4) == [3]
    with pytest.raises(IdsExhausted) as caught:
        allocate_ids([None, None], [1, 2, 4], 1, 4)
    assert caught.value.capacity == 4 and "at most 4" in str(caught.value)


@given(st.lists(st.none() | st.integers(-2, 40), max_size=30), st.sets(st.integers(0, 40), max_size=30))
def test_ids_are_distinct_free_in_range_and_honour_free_wishes(wanted, taken) -> None:
    first, last = 1, 32
    free = set(range(first, last + 1)) - taken
    try:
        ids = allocate_ids(wanted, taken, first, last)
    except IdsExhausted:
        assert len(wanted) > len(free)
        return
    assert len(ids) == len(wanted) == len(set(ids)) and set(ids) <= free
    for i, want in enumerate(wanted):
        if want in free and want not in wanted[:i]:
            assert ids[i] == want


def test_the_two_tables_ranges_do_not_meet() -> None:
    daemon = allocate_ids([None] * 3, [], 1, MAX_DAEMON_ID)
    cni = allocate_ids([None] * 3, [], MAX_DAEMON_ID + 1, MAX_MAPPING_ID)
    assert max(daemon) < min(cni)
