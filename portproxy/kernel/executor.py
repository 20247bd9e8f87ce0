"""The one place that talks to libnftables: apply a JSON batch in a single call, or fail clearly.

libnftables applies a batch atomically (one netlink transaction): either every
command took effect or none did, so callers update their own bookkeeping only
after :meth:`Nft.apply` returned. Calls block; run them off the data-plane loop.
"""

from __future__ import annotations

import ctypes
import json
import threading
from typing import Any

from ..errors import SystemFailure, Unavailable
from .builders import Json, batch


class NftError(SystemFailure):
    """libnftables refused a batch; the message is one readable line."""


class NftUnavailable(NftError, Unavailable):
    """libnftables cannot be used here at all (no CAP_NET_ADMIN, no library)."""

    http_status = 503


def release_memory() -> None:
    """Give freed heap back to the system after a large batch.

    A range of 65,535 ports is a few hundred MB of JSON on its way through
    libnftables; glibc keeps that arena after it is freed unless asked."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


LARGE_BATCH = 2000


def _element_count(commands: list[Json]) -> int:
    return sum(len(body.get("element", {}).get("elem", ())) for c in commands for body in c.values())


def _first_error_line(text: str) -> str:
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Error:"):
            return line[len("Error:"):].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "unknown error"


CAP_NET_ADMIN = 12


def has_capability(cap: int) -> bool:
    """Whether this process has ``cap`` in its effective set (from /proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except OSError:
        pass
    return True  # cannot tell: let the kernel decide


class Nft:
    """A libnftables context with JSON in and out (one per thread that uses it)."""

    def __init__(self) -> None:
        # Checked first: without it libnftables also prints its own complaint to stderr.
        if not has_capability(CAP_NET_ADMIN):
            raise NftUnavailable("the kernel path needs CAP_NET_ADMIN to manage nftables rules (run as root or grant it)")
        try:
            import nftables
        except ImportError as exc:
            raise NftUnavailable(f"the nftables Python bindings are missing ({exc}); install pip-nftables") from None
        try:
            ctx = nftables.Nftables()
        except OSError as exc:
            raise NftUnavailable(f"libnftables cannot be loaded ({exc}); install Debian's libnftables1") from None
        ctx.set_json_output(True)
        ctx.set_handle_output(False)
        self._ctx = ctx
        self._lock = threading.Lock()

    def apply(self, commands: list[Json]) -> Any:
        """Run ``commands`` as one atomic batch; raise NftError with nft's reason."""
        with self._lock:
            rc, output, error = self._ctx.json_cmd(batch(commands))
        if _element_count(commands) > LARGE_BATCH:
            release_memory()
        if rc != 0:
            reason = _first_error_line(error or output or "")
            if "Operation not permitted" in (error or ""):
                reason = "operation not permitted (CAP_NET_ADMIN is needed for nftables)"
            raise NftError(f"nftables refused the change: {reason}")
        return output

    def query(self, command: Json) -> dict:
        """Run one read-only command (already wrapped with :func:`batch`) and parse its JSON."""
        with self._lock:
            rc, output, error = self._ctx.json_cmd(command)
        if rc != 0:
            raise NftError(f"nftables query failed: {_first_error_line(error or '')}")
        if isinstance(output, (str, bytes)):
            return json.loads(output) if output else {}
        return output or {}

    def table_exists(self, family: str, name: str) -> bool:
        try:
            out = self.query(batch([{"list": {"table": {"family": family, "name": name}}}]))
        except NftError:
            return False
        return bool(out)
