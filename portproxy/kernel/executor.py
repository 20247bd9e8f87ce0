"""The one place that talks to libnftables: apply a JSON batch in a single call, or fail clearly.

libnftables applies a batch atomically (one netlink transaction): either every
command took effect or none did, so callers update their own bookkeeping only
after :meth:`Nft.apply` returned. Calls block; run them off the data-plane loop.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from .builders import Json, batch


class NftError(Exception):
    """libnftables refused a batch or is unusable; the message is one readable line."""


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
            raise NftError("the kernel path needs CAP_NET_ADMIN to manage nftables rules (run as root or grant it)")
        try:
            import nftables
        except ImportError as exc:
            raise NftError(f"the nftables Python bindings are missing ({exc}); install pip-nftables") from None
        try:
            ctx = nftables.Nftables()
        except OSError as exc:
            raise NftError(f"libnftables cannot be loaded ({exc}); install Debian's libnftables1") from None
        ctx.set_json_output(True)
        ctx.set_handle_output(False)
        self._ctx = ctx
        self._lock = threading.Lock()

    def apply(self, commands: list[Json]) -> Any:
        """Run ``commands`` as one atomic batch; raise NftError with nft's reason."""
        with self._lock:
            rc, output, error = self._ctx.json_cmd(batch(commands))
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
