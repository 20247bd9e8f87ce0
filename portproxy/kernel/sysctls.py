"""The sysctls the kernel path depends on: checked, and changed only when the user says so.

Paths are read from /proc/sys of the calling thread's network namespace.
"""

from __future__ import annotations

from ..errors import SystemFailure
from ..spec import Mapping

FORWARD_V4 = "net/ipv4/ip_forward"
FORWARD_V6 = "net/ipv6/conf/all/forwarding"
ROUTE_LOCALNET = "net/ipv4/conf/all/route_localnet"


def _read(key: str) -> str | None:
    try:
        with open(f"/proc/sys/{key}") as f:
            return f.read().strip()
    except OSError:
        return None


def _write(key: str, value: str) -> None:
    with open(f"/proc/sys/{key}", "w") as f:
        f.write(value)


def required(mappings: list[Mapping], route_localnet: bool) -> list[str]:
    keys = []
    if any(m.family == 4 for m in mappings):
        keys.append(FORWARD_V4)
    if any(m.family == 6 for m in mappings):
        keys.append(FORWARD_V6)
    if route_localnet:
        keys.append(ROUTE_LOCALNET)
    return keys


def missing(keys: list[str]) -> list[str]:
    """The keys among ``keys`` that are not 1."""
    return [key for key in keys if _read(key) != "1"]


def describe(key: str) -> str:
    return key.replace("/", ".")


def ensure(keys: list[str], set_them: bool) -> list[str]:
    """Return the keys that had to be changed; raise SysctlError if any is off and may not be set."""
    off = missing(keys)
    if off and not set_them:
        names = ", ".join(f"{describe(k)}=1" for k in off)
        raise SysctlError(f"the kernel path needs {names}; set it, or pass --set-sysctls to let portproxy set it")
    for key in off:
        try:
            _write(key, "1")
        except OSError as exc:
            raise SysctlError(f"cannot set {describe(key)}=1: {exc.strerror}") from None
    return off


class SysctlError(SystemFailure):
    """A required sysctl is off; the message is one line naming it."""
