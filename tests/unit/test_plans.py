"""The controller's plans as tables: each change as its exact ordered steps (no root, no sockets)."""

from __future__ import annotations

import pytest

from portproxy.controller import plan
from portproxy.controller.config import Config, DaemonOptions, Settings
from portproxy.controller.plan import (ClearTable, Commit, Dnat, DnatPresent, EnsureRouting, ForgetStats, ForgetUdp,
                                       Grace, Hairpin, Hold, InstallTable, Pause, Release, ReloadOp, Serve, Target)
from portproxy.controller.state import SavedEntry
from portproxy.kernel.builders import KernelOptions
from portproxy.proxy.options import ProxyOptions
from portproxy.spec import parse_spec

K = KernelOptions()
O = ProxyOptions()
T = Target(O)
TCP = parse_spec("0.0.0.0:9090:10.0.0.2:80")
UDP = parse_spec("0.0.0.0:5353:10.0.0.2:53/udp")
BOTH = parse_spec("9091:10.0.0.2:80")  # no host address: an IPv4 and an IPv6 family
V4, V6 = BOTH.per_family()
V6_TO_V6 = parse_spec("[::]:9092:[fd00::2]:80")


# --- switching: userland -> kernel -> hybrid -> userland, make before break -----------------------

@pytest.mark.parametrize("old, new, steps", [
    ("userland", "kernel", [Dnat(add=(TCP,)), Hairpin((TCP,)), Commit(), Grace(), Pause(TCP)]),
    ("kernel", "hybrid", [Serve(TCP), Commit()]),
    ("hybrid", "userland", [Commit(), Dnat(remove=(TCP,))]),
    ("userland", "hybrid", [Dnat(add=(TCP,)), Hairpin((TCP,)), Commit()]),
    ("hybrid", "kernel", [Commit(), Pause(TCP)]),
    ("kernel", "userland", [Serve(TCP), Commit(), Dnat(remove=(TCP,))]),
])
def test_switch_of_a_tcp_mapping(old, new, steps) -> None:
    assert plan.switch(TCP, old, new, True, T, K) == steps


def test_switch_of_a_udp_mapping_forgets_its_conntrack_entries_last() -> None:
    assert plan.switch(UDP, "userland", "kernel", True, T, K) == [
        Dnat(add=(UDP,)), Hairpin((UDP,)), Commit(), Grace(), Pause(UDP), ForgetUdp((UDP,), True)]
    assert plan.switch(UDP, "kernel", "userland", True, T, K) == [
        Serve(UDP), Commit(), Dnat(remove=(UDP,)), ForgetUdp((UDP,), False)]


def test_switch_keeps_the_kernel_id_and_of_a_failed_mapping_only_records() -> None:
    assert plan.switch(TCP, "userland", "kernel", True, Target(O, kernel_id=7), K)[0] == Dnat(
        add=(TCP,), preferred=((TCP, 7),))
    assert plan.switch(TCP, "userland", "kernel", False, T, K) == [Commit()]


def test_an_ipv6_client_to_an_ipv4_target_is_proxied_on_every_mode() -> None:
    """The IPv6 family of BOTH cannot be translated (no NAT64): its listener stays."""
    assert plan.proxied_reason(V6, K) and not plan.proxied_reason(V4, K)
    assert plan.switch(BOTH, "userland", "kernel", True, T, K) == [
        Dnat(add=(V4,)), Hairpin((V4,)), Commit(), Grace(), Pause(V4)]
    assert plan.add(BOTH, "kernel", T, K) == [Hold(V4, O, False), Hold(V6, O, True), Dnat(add=(V4,)),
                                              Hairpin((V4,)), Commit()]
    assert plan.remove(BOTH, "kernel", True, T, K) == [Commit(), Release(V4, O), Release(V6, O), Dnat(remove=(V4,)),
                                                       ForgetStats((V4, V6))]


# --- add and remove of each mode -------------------------------------------------------------------

@pytest.mark.parametrize("mode, steps", [
    ("userland", [Hold(TCP, O, True), Commit()]),
    ("kernel", [Hold(TCP, O, False), Dnat(add=(TCP,)), Hairpin((TCP,)), Commit()]),
    ("hybrid", [Hold(TCP, O, True), Dnat(add=(TCP,)), Hairpin((TCP,)), Commit()]),
])
def test_add_holds_the_port_before_any_dnat(mode, steps) -> None:
    assert plan.add(TCP, mode, T, K) == steps


@pytest.mark.parametrize("mode, steps", [
    ("userland", [Commit(), Release(UDP, O), ForgetStats((UDP,))]),
    ("kernel", [Commit(), Release(UDP, O), Dnat(remove=(UDP,)), ForgetUdp((UDP,), False), ForgetStats((UDP,))]),
    ("hybrid", [Commit(), Release(UDP, O), Dnat(remove=(UDP,)), ForgetUdp((UDP,), False), ForgetStats((UDP,))]),
])
def test_remove_is_saved_before_anything_is_touched(mode, steps) -> None:
    assert plan.remove(UDP, mode, True, T, K) == steps


def test_add_of_a_udp_kernel_mapping_forgets_stale_entries_after_the_commit() -> None:
    assert plan.add(UDP, "kernel", T, K) == [Hold(UDP, O, False), Dnat(add=(UDP,)), Hairpin((UDP,)), Commit(),
                                             ForgetUdp((UDP,), True)]


def test_remove_of_a_failed_mapping_only_forgets_it() -> None:
    assert plan.remove(TCP, "hybrid", False, T, K) == [Commit(), ForgetStats((TCP,))]


def test_a_transparent_listener_gets_its_routing_first() -> None:
    transparent = Target(O, transparent=True)
    assert plan.add(TCP, "userland", transparent, K) == [EnsureRouting(), Hold(TCP, O, True), Commit()]
    assert plan.add(TCP, "kernel", transparent, K) == [Hold(TCP, O, False), Dnat(add=(TCP,)), Hairpin((TCP,)),
                                                       Commit()]


def test_realise_has_no_commit_and_after_the_start_batch_claims_its_dnat() -> None:
    assert plan.realise(TCP, "hybrid", T, K) == [Hold(TCP, O, True), Dnat(add=(TCP,)), Hairpin((TCP,))]
    assert plan.realise(TCP, "hybrid", T, K, dnat_present=True) == [DnatPresent((TCP,)), Hold(TCP, O, True)]
    assert plan.realise(TCP, "userland", T, K, dnat_present=True) == [Hold(TCP, O, True)]


# --- CNI mappings: no port held, only what DNAT can serve ---------------------------------------------

def test_a_cni_mapping_holds_no_port_and_skips_what_dnat_cannot_serve() -> None:
    cni = Target(O, holds_ports=False)
    assert plan.add(TCP, "kernel", cni, K) == [Dnat(add=(TCP,)), Hairpin((TCP,)), Commit()]
    assert plan.add(BOTH, "kernel", cni, K) == [Dnat(add=(V4,)), Hairpin((V4,)), Commit()]
    assert plan.remove(BOTH, "kernel", True, cni, K) == [Commit(), Dnat(remove=(V4,)), ForgetStats((V4, V6))]


# --- a CNI owner's declared set ---------------------------------------------------------------------------

KERNEL = Settings("kernel")
A, B, C = (parse_spec(f"0.0.0.0:{p}:10.88.0.2:80") for p in (9100, 9101, 9102))
AU = parse_spec("0.0.0.0:9103:10.88.0.2:53/udp")


def test_declare_keeps_adds_and_removes_in_one_kernel_transaction() -> None:
    changed = Settings("kernel", (("connect_timeout", 2.0),))
    owned = plan.declare({A: KERNEL, B: KERNEL, C: KERNEL}, {A: KERNEL, C: changed, BOTH: KERNEL},
                         installed={A: 1, B: 2, C: 3}, kernel=K)
    assert (owned.add, owned.remove, owned.keep) == ([C, BOTH], [B, C], [A])
    assert (owned.kernel_add, owned.kernel_remove) == ([V4], [B])  # C's DNAT, the same, stays
    assert owned.steps == [Dnat(add=(V4,), remove=(B,)), Commit(), ForgetStats((B,))]


def test_declare_with_nothing_to_add_saves_first_and_the_same_set_does_nothing() -> None:
    owned = plan.declare({A: KERNEL, AU: KERNEL}, {}, installed={A: 1, AU: 2}, kernel=K)
    assert owned.steps == [Commit(), Dnat(remove=(A, AU)), ForgetStats((A, AU)), ForgetUdp((AU,), False)]
    same = plan.declare({A: KERNEL}, {A: KERNEL}, installed={A: 1}, kernel=K)
    assert (same.add, same.remove, same.keep, same.steps) == ([], [], [A], [Commit()])


def test_declare_adds_with_the_ids_the_owner_had() -> None:
    owned = plan.declare({}, {AU: KERNEL}, installed={}, kernel=K, kernel_ids={AU: 9})
    assert owned.steps == [Dnat(add=(AU,), preferred=((AU, 9),)), Commit(), ForgetUdp((AU,), True)]


# --- the start ------------------------------------------------------------------------------------------

def test_start_table_is_one_batch_with_the_saved_ids() -> None:
    assert plan.start_table({TCP: ("kernel", 4), UDP: ("hybrid", None), A: ("userland", 2), BOTH: ("kernel", None)},
                            K) == [InstallTable((TCP, UDP, V4), ((TCP, 4),)), Hairpin((TCP, UDP, V4)),
                                   ForgetUdp((UDP,), True)]
    assert plan.start_table({A: ("userland", None)}, K) == [ClearTable()]


def test_desired_at_start_takes_saved_api_and_cni_then_the_config() -> None:
    saved = [SavedEntry(A, KERNEL, "api", kernel_id=3), SavedEntry(B, KERNEL, "config", kernel_id=5),
             SavedEntry(C, KERNEL, "cni", {"kind": "cni", "id": "x"})]
    desired = plan.desired_at_start(saved, Config(DaemonOptions(), {B: Settings("hybrid")}))
    assert desired == {A: plan.Desired(KERNEL, "api", None, 3),
                       C: plan.Desired(KERNEL, "cni", {"kind": "cni", "id": "x"}),
                       B: plan.Desired(Settings("hybrid"), "config", kernel_id=5)}


# --- a reload --------------------------------------------------------------------------------------------

def test_reload_diff_removes_first_then_adds_replaces_switches_and_refuses() -> None:
    quick = Settings("userland", (("connect_timeout", 1.0),))
    current = {A: (KERNEL, "config"), B: (KERNEL, "config"), C: (KERNEL, "config"), TCP: (KERNEL, "api"),
               UDP: (KERNEL, "config")}
    config = Config(DaemonOptions(), {B: quick, C: Settings("hybrid"), TCP: KERNEL, UDP: KERNEL, AU: KERNEL})
    assert plan.reload_diff(current, config) == [
        ReloadOp("remove", A), ReloadOp("replace", B, quick), ReloadOp("switch", C, Settings("hybrid")),
        ReloadOp("refuse", TCP, KERNEL, "exists already as a mapping of the api (remove it there first); "
                 "left as it is"),
        ReloadOp("add", AU, KERNEL)]


def test_options_changed_names_every_changed_key() -> None:
    assert plan.options_changed((("a", 1), ("b", 2)), (("a", 1), ("b", 3), ("c", 4))) == ["b", "c"]
    assert plan.options_changed((("a", 1),), ()) == ["a"]
    assert plan.options_changed((("a", 1),), (("a", 1),)) == []


def test_v6_to_v6_is_translated() -> None:
    assert not plan.proxied_reason(V6_TO_V6, K)
    assert plan.served_by(plan.part_components(V6, plan.components("kernel"), K)) == "userland"


# --- portproxy map ---------------------------------------------------------------------------------------

def test_map_holds_every_port_first_then_one_batch_replaces_the_table() -> None:
    assert plan.foreground([TCP, BOTH, UDP], "kernel", T, K) == [
        Hold(TCP, O, False), Hold(V4, O, False), Hold(V6, O, True), Hold(UDP, O, False),
        InstallTable((TCP, V4, UDP)), Hairpin((TCP, V4, UDP)), ForgetUdp((UDP,), True)]


def test_map_userland_listens_on_every_family_and_routes_once_when_transparent() -> None:
    assert plan.foreground([TCP, BOTH], "userland", Target(O, transparent=True), K) == [
        EnsureRouting(), Hold(TCP, O, True), Hold(V4, O, True), Hold(V6, O, True)]
