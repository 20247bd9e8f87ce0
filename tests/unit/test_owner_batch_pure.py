"""The pure planning under ``PUT /v1/owners/mappings``: what a declared set keeps, replaces and removes, and the overlap check."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from portproxy.controller.config import Settings
from portproxy.controller.plan import declare as plan_owned
from portproxy.kernel.builders import KernelOptions
from portproxy.spec import SpecError, _listen_key_overlaps, check_no_overlap, parse_spec


def test_plan_keeps_identical_replaces_changed_and_skips_what_dnat_cannot_serve() -> None:
    kept, gone, changed = (parse_spec(s) for s in ("0.0.0.0:9090:10.88.0.2:80", "0.0.0.0:9091:10.88.0.2:80",
                                                   "0.0.0.0:9092:10.88.0.2:80"))
    both = parse_spec("9093:10.88.0.2:80")  # no host address: IPv4 by DNAT, the IPv6 part skipped
    quicker = Settings("kernel", (("connect_timeout", 2.0),))
    plan = plan_owned({kept: KERNEL, gone: KERNEL, changed: KERNEL}, {kept: KERNEL, changed: quicker, both: KERNEL},
                      installed={kept: 1, gone: 2, changed: 3}, kernel=KernelOptions())
    assert (plan.add, plan.remove, plan.keep) == ([changed, both], [gone, changed], [kept])
    v4 = both.per_family()[0]
    assert v4.host_ip.version == 4
    assert plan.kernel_add == [v4]  # the changed mapping's DNAT, the same, stays in place
    assert plan.kernel_remove == [gone]


def test_plan_removes_only_what_is_installed_and_nothing_for_the_same_set() -> None:
    a, b = parse_spec("[::]:9090:[fd00::2]:80/udp"), parse_spec("0.0.0.0:9091:10.88.0.2:80")
    assert plan_owned({a: KERNEL, b: KERNEL}, {}, installed={a: 7}, kernel=KernelOptions()).kernel_remove == [a]
    same = plan_owned({a: KERNEL, b: KERNEL}, {b: KERNEL, a: KERNEL}, installed={a: 7, b: 8}, kernel=KernelOptions())
    assert (same.add, same.remove, same.kernel_add, same.kernel_remove) == ([], [], [], [])
    assert sorted(map(str, same.keep)) == sorted(map(str, (a, b)))


specs = st.builds(lambda host, port, width, proto: f"{host}{port}-{port + width}:10.0.0.1:{port}-{port + width}/{proto}",
                  st.sampled_from(["", "0.0.0.0:", "10.0.0.9:", "[::]:", "[fd00::9]:"]),
                  st.integers(1000, 1040), st.integers(0, 5), st.sampled_from(["tcp", "udp"]))


@settings(max_examples=300, deadline=None)
@given(st.lists(specs, max_size=12))
def test_overlap_check_finds_what_comparing_every_pair_finds(texts: list[str]) -> None:
    mappings = [parse_spec(t) for t in texts]
    pairwise = any(_listen_key_overlaps(a, b) for i, a in enumerate(mappings) for b in mappings[i + 1:])
    try:
        check_no_overlap(mappings)
        found = False
    except SpecError:
        found = True
    assert found == pairwise


KERNEL = Settings("kernel")
