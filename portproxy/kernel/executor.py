"""The one place that talks to libnftables: apply a JSON batch in a single call, or fail clearly.

libnftables applies a batch atomically (one netlink transaction): either every
command took effect or none did, so callers update their own bookkeeping only
after :meth:`Nft.apply` returned. Calls block; run them off the data-plane loop.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import socket
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


# --- a netlink socket below FD_SETSIZE ---------------------------------------------------------

FD_SETSIZE = 1024
"""libnftables (1.0.6, Debian 12) waits for netlink replies with select(): its socket's
descriptor must be below this, or glibc's fortify check aborts the whole process."""

RESERVE = 8
"""Low descriptors held for nft contexts: more than the contexts a process keeps open at
once (the kernel path's, the metrics', a short-lived one per transparent or CNI call)."""

NETLINK_NETFILTER = 12


class LowDescriptors:
    """A few descriptors below FD_SETSIZE, held on /dev/null, given up one at a time so that
    a new nft context's socket takes a low number however many sockets the process holds.

    :meth:`take` runs at process start, before any port is opened (``raise_fd_limit``,
    which is what allows descriptors past FD_SETSIZE at all), and again whenever a context
    is created or freed, to refill from whatever low numbers are free. A context opens its
    socket when it is created (not per command), so the socket is the lowest free descriptor
    at that moment: giving up one reserved number just before makes that number the lowest
    free one. Another thread may open a descriptor in between and take it; so the new
    socket's number is read back from the context, and a context whose socket landed too high
    is freed and tried again with the next reserved number.
    """

    def __init__(self, size: int = RESERVE) -> None:
        self.size = size
        self.lock = threading.RLock()
        self._held: list[int] = []

    def take(self) -> None:
        """Hold low free descriptors until ``size`` are held (fewer if none are left below FD_SETSIZE)."""
        with self.lock:
            while len(self._held) < self.size:
                try:
                    fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    return
                if fd >= FD_SETSIZE:
                    os.close(fd)
                    return
                self._held.append(fd)

    def give_up_one(self) -> bool:
        """Free the lowest held descriptor (call with :attr:`lock` held); False if none is held."""
        if not self._held:
            return False
        self._held.sort()
        os.close(self._held.pop(0))
        return True

    def held(self) -> int:
        return len(self._held)


LOW = LowDescriptors()
"""The process's reserve (one per process: descriptors are)."""


def reserve_low_descriptors() -> None:
    """Take the reserve; call at process start, before the process opens its ports."""
    LOW.take()


@functools.cache
def _mnl_socket_get_fd() -> Any:
    function = ctypes.CDLL("libmnl.so.0").mnl_socket_get_fd
    function.argtypes = [ctypes.c_void_p]
    function.restype = ctypes.c_int
    return function


def socket_fd(ctx: Any) -> int | None:
    """The descriptor of a context's netlink socket, or None if it cannot be read back.

    The binding does not expose it: ``struct nft_ctx`` begins with its ``struct mnl_socket *``
    (libnftables 1.0.6), and libmnl's ``mnl_socket_get_fd`` gives that socket's descriptor.
    The answer is checked to be a netfilter netlink socket, so another layout gives None,
    not a wrong number."""
    try:
        pointer = getattr(ctx, "_Nftables__ctx")
        nf_sock = ctypes.c_void_p.from_address(pointer).value
        if not nf_sock:
            return None
        fd = _mnl_socket_get_fd()(nf_sock)
        probe = socket.socket(fileno=os.dup(fd))
    except (AttributeError, TypeError, ValueError, OSError):
        return None
    try:
        is_netfilter = (probe.family == socket.AF_NETLINK
                        and probe.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) == NETLINK_NETFILTER)
    except OSError:
        is_netfilter = False
    finally:
        probe.close()
    return fd if is_netfilter else None


def _highest_descriptor() -> int:
    try:
        return max(int(name) for name in os.listdir("/proc/self/fd"))
    except (OSError, ValueError):
        return FD_SETSIZE


def open_context(nftables: Any) -> Any:
    """A new ``nftables.Nftables()`` whose socket is below FD_SETSIZE, or NftUnavailable."""
    with LOW.lock:
        fd: int | None = None
        while True:
            gave_up = LOW.give_up_one()
            ctx = nftables.Nftables()
            fd = socket_fd(ctx)
            if fd is None and _highest_descriptor() < FD_SETSIZE:
                fd = -1  # unknown layout, but every descriptor of the process is low
            if fd is not None and fd < FD_SETSIZE:
                LOW.take()
                return ctx
            del ctx  # frees the context and closes its socket
            if fd is None or not gave_up:
                break
    if fd is None:
        raise NftUnavailable("cannot tell which descriptor libnftables' netlink socket has (unknown libnftables "
                             f"layout), so cannot keep it below {FD_SETSIZE} as its select() requires")
    raise NftUnavailable(f"libnftables' netlink socket got descriptor {fd}, and its select() cannot wait on one "
                         f"past {FD_SETSIZE - 1}: this process holds too many descriptors to open an nft context")


class Nft:
    """A libnftables context with JSON in and out (one per thread that uses it).

    Its netlink socket is always below FD_SETSIZE (see :class:`LowDescriptors`); when the
    context is freed, its descriptor goes back to the reserve."""

    def __init__(self) -> None:
        # Checked first: without it libnftables also prints its own complaint to stderr.
        if not has_capability(CAP_NET_ADMIN):
            raise NftUnavailable("the kernel path needs CAP_NET_ADMIN to manage nftables rules (run as root or grant it)")
        try:
            import nftables
        except ImportError as exc:
            raise NftUnavailable(f"the nftables Python bindings are missing ({exc}); install pip-nftables") from None
        try:
            ctx = open_context(nftables)
        except OSError as exc:
            raise NftUnavailable(f"libnftables cannot be loaded ({exc}); install Debian's libnftables1") from None
        ctx.set_json_output(True)
        ctx.set_handle_output(False)
        self._ctx = ctx
        self._lock = threading.Lock()

    def close(self) -> None:
        """Free the context now and refill the reserve with the descriptor it frees."""
        ctx = self.__dict__.pop("_ctx", None)
        if ctx is None:
            return
        with LOW.lock:
            del ctx  # the binding's __del__ frees the context and closes its socket
            LOW.take()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit os or the lock may be gone
            pass

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
