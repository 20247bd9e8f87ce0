"""One desired mapping as the controller keeps it, and who may own one."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import BadInput, Conflict, NotFound, shorten
from ..proxy.options import ProxyOptions
from ..spec import Mapping, SpecError, check_no_overlap, parse_spec
from .auto import COOL, AutoPolicy
from .config import Mode, Settings
from .plan import PERSISTED_ORIGINS, Target, is_transparent, mapping_options


@dataclasses.dataclass
class Entry:
    settings: Settings
    origin: str
    """Who asked for the mapping: "config" (owned by the config file, changed by reload), "api",
    "docker", "cni". Not the ``source`` option (the address the target sees); the API and the
    state file still call this field "source"."""
    owner: dict[str, str] | None = None
    """Who asked for an owned mapping (a container: kind, id, name); removed with it."""
    status: str = "pending"
    """"running", or "failed" (then ``error`` says why and it is retried)."""
    error: str | None = None
    failures: int = 0
    retry_at: float = 0.0
    kernel_id: int | None = None
    """The mapping's id in the nft table, kept across restarts."""
    auto: AutoPolicy | None = None
    """An auto mapping's policy: where it is now and how loaded (not saved: it starts light)."""

    @property
    def mode(self) -> Mode:
        return self.settings.mode

    @property
    def path(self) -> Mode:
        """The mode the mapping runs as now: its own, or an auto mapping's place."""
        if self.settings.mode == "auto":
            return self.auto.place if self.auto is not None else COOL
        return self.settings.mode

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def holds_ports(self) -> bool:
        """Whether the mapping binds its host ports itself. A CNI runtime (podman's conmon)
        reserves the ports of its containers, so their mappings are DNAT only."""
        return self.origin != "cni"

    @property
    def persisted(self) -> bool:
        return self.origin in PERSISTED_ORIGINS

    def target(self, defaults: ProxyOptions, settings: Settings | None = None) -> Target:
        """What the planner needs of this entry (with ``settings`` instead of its own, for a switch)."""
        settings = settings or self.settings
        return Target(mapping_options(settings, defaults), self.holds_ports, is_transparent(settings, defaults),
                      self.kernel_id)


def origin_of(owner: dict[str, str] | None) -> str:
    """The origin of a mapping a request adds (who asked for it): the container engine that owns it, else the API."""
    return owner["kind"] if owner and owner.get("kind") in ("docker", "cni") else "api"


OWNER_IDENTITY = ("kind", "id", "ifname", "network")
"""What names the owner of a declared set (one CNI attachment); its other fields (the pod's
name and namespace) are for display, and a declaration updates them."""


def same_owner(a: dict[str, str] | None, b: dict[str, str]) -> bool:
    return a is not None and all(a.get(k, "") == b.get(k, "") for k in OWNER_IDENTITY)


def validate_owner(owner: Any) -> dict[str, str] | None:
    if owner is None:
        return None
    if not isinstance(owner, dict) or not owner.get("id") or owner.get("kind") not in ("docker", "cni"):
        raise BadInput("owner must be an object with kind (docker or cni) and id")
    if len(owner) > 16 or not all(isinstance(k, str) and isinstance(v, str) and len(v) <= 256
                                  for k, v in owner.items()):
        raise BadInput("owner fields must be at most 16 short strings")
    return dict(owner)


def check_settings(mapping: Mapping, settings: Settings, defaults: ProxyOptions) -> None:
    """What no path can do for a mapping: a PROXY header on the kernel path."""
    from ..proxy.proxy_protocol import refusal

    reason = refusal(mapping.proto, settings.mode, mapping_options(settings, defaults).proxy_protocol)
    if reason:
        raise BadInput(f"mapping {mapping}: {reason}")


def check_declared(owner: Any, wanted: list[tuple[Mapping, Settings]], defaults: ProxyOptions) -> dict[str, str]:
    """A CNI owner's declared set as a request gives it: the owner, kernel mappings only
    (the runtime holds the ports), settings every path can run, no overlap within it."""
    checked = validate_owner(owner)
    if checked is None or origin_of(checked) != "cni":
        raise BadInput("owner must be an object with kind cni and id: a declared set is a CNI attachment's "
                       "(add other mappings one by one with POST /v1/mappings)")
    for mapping, settings in wanted:
        if settings.mode != "kernel":
            raise BadInput(f"mapping {mapping}: mode {settings.mode}: a declared set takes kernel mappings "
                           "only (the runtime holds the ports); add userland or hybrid mappings one by one "
                           "with POST /v1/mappings")
        check_settings(mapping, settings, defaults)
    try:
        check_no_overlap([m for m, _ in wanted])
    except SpecError as exc:
        raise BadInput(f"the request's {exc}") from None
    return checked


def resolve(entries: dict[Mapping, Any], name: str) -> Mapping:
    """A mapping named by its full spec, or by HOST_PORT[/PROTO] when that is unambiguous."""
    try:
        wanted = parse_spec(name)
    except SpecError:
        wanted = None
    if wanted is not None:
        if wanted in entries:
            return wanted
        raise NotFound(f"no mapping {wanted}")
    port_text, _, proto = name.strip().partition("/")
    if not port_text.isdigit() or len(port_text) > 5 or proto not in ("", "tcp", "udp"):
        raise BadInput(f"{shorten(name)} is neither a mapping spec nor HOST_PORT[/PROTO]")
    port = int(port_text)
    found = [m for m in entries if m.host_port <= port <= m.host_port_end and (not proto or m.proto == proto)]
    if not found:
        raise NotFound(f"no mapping on port {name}")
    if len(found) > 1:
        raise Conflict(f"port {name} is ambiguous: {', '.join(str(m) for m in found)}")
    return found[0]
