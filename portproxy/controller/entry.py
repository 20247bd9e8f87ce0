"""One desired mapping as the controller keeps it, and who may own one."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import BadInput
from ..proxy.options import ProxyOptions
from .config import Mode, Settings
from .plan import PERSISTED_SOURCES, Target, is_transparent, mapping_options


@dataclasses.dataclass
class Entry:
    settings: Settings
    source: str
    """"config" (owned by the config file, changed by reload), "api", "docker", "cni"."""
    owner: dict[str, str] | None = None
    """Who asked for an owned mapping (a container: kind, id, name); removed with it."""
    status: str = "pending"
    """"running", or "failed" (then ``error`` says why and it is retried)."""
    error: str | None = None
    failures: int = 0
    retry_at: float = 0.0
    kernel_id: int | None = None
    """The mapping's id in the nft table, kept across restarts."""

    @property
    def mode(self) -> Mode:
        return self.settings.mode

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def holds_ports(self) -> bool:
        """Whether the mapping binds its host ports itself. A CNI runtime (podman's conmon)
        reserves the ports of its containers, so their mappings are DNAT only."""
        return self.source != "cni"

    @property
    def persisted(self) -> bool:
        return self.source in PERSISTED_SOURCES

    def target(self, defaults: ProxyOptions, settings: Settings | None = None) -> Target:
        """What the planner needs of this entry (with ``settings`` instead of its own, for a switch)."""
        settings = settings or self.settings
        return Target(mapping_options(settings, defaults), self.holds_ports, is_transparent(settings, defaults),
                      self.kernel_id)


def source_of(owner: dict[str, str] | None) -> str:
    """The source of a mapping a request adds: the container engine that owns it, else the API."""
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
    if len(owner) > 16 or not all(isinstance(k, str) and isinstance(v, str) and len(v) <= 256 for k, v in owner.items()):
        raise BadInput("owner fields must be at most 16 short strings")
    return dict(owner)
