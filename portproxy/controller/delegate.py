"""Delegation: docker-proxy drop-ins hand their listening socket to the daemon.

A second unix socket beside the control socket, ``<control socket>.delegate``, of type
SOCK_SEQPACKET (message boundaries, no framing to parse, and an EOF that says the
peer is gone). One connection is one published port:

1. the drop-in sends ONE request message (the mapping's spec, its docker owner, maybe
   options), with its bound socket attached (SCM_RIGHTS);
2. the daemon adds the mapping (origin ``docker``: never persisted, dockerd owns it) with
   that socket, and answers ONE message: served, refused with one line, or "another
   network namespace" (the drop-in then serves in-process). Both messages are written
   and read by :mod:`portproxy.delegation` alone;
3. the connection is then held by both sides. When it ends, however the drop-in's waiting
   process ended (dockerd's SIGINT/SIGTERM, SIGKILL, a crash), the daemon removes the
   mapping of that owner. The owner id is unique per connection (the drop-in's pid and its
   port), so nothing else is touched, and nothing is left behind.

Peers are checked as on the control socket (SO_PEERCRED: root, the daemon's user, the
socket group). Everything runs on the event loop without blocking: non-blocking sockets,
``loop.sock_accept`` and ``add_reader``.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import socket
from pathlib import Path
from typing import Any

from ..errors import BadInput, Conflict, PortproxyError, shorten
from ..spec import Mapping, parse_spec
from .api import PeerPolicy, peer_credentials
from .. import delegation, netident, schema
from .config import Settings
from .core import Controller

log = logging.getLogger("portproxy.delegate")

MAX_MESSAGE, MAX_FDS, REQUEST_TIMEOUT = delegation.MAX_REQUEST, delegation.MAX_FDS, delegation.REQUEST_TIMEOUT


def delegate_path(control_socket: Path) -> Path:
    """Where the delegate socket of the daemon on ``control_socket`` is."""
    return control_socket.with_name(control_socket.name + ".delegate")


def parse_request(data: bytes) -> tuple[Mapping, dict[str, str], Settings]:
    """The one request message (:mod:`portproxy.delegation`): a one-family mapping, its docker
    owner and the per-mapping options dockerd's environment gave the drop-in (pure; BadInput)."""
    request = delegation.decode_request(data)
    mapping = parse_spec(request.spec)
    if mapping.host_ip is None or mapping.port_count != 1:
        raise BadInput(f"{mapping}: a delegated mapping is one port with a host address")
    if "mode" in request.options:
        raise BadInput("a delegated mapping starts on the userland path: no mode in its options")
    return mapping, request.owner, Settings.from_values(schema.check_table(request.options, schema.MAPPING, "options"))


class OtherNamespace(BadInput):
    """The handed socket lives in another network namespace than the daemon's."""


def check_namespace(sock: socket.socket, peer_pid: int) -> None:
    """Refuse a socket of another network namespace: its port is not ours to serve.

    Where the socket's namespace cannot be read (no CAP_NET_ADMIN), the namespace of the
    process that sent it (SO_PEERCRED's pid) stands in for the socket's."""
    try:
        ours = netident.in_own_netns(sock, peer_pid)
    except OSError as exc:
        raise OtherNamespace(f"cannot tell the socket's network namespace: {exc.strerror or exc}") from None
    if not ours:
        raise OtherNamespace("the socket handed over is in another network namespace than the daemon")


def check_socket(mapping: Mapping, sock: socket.socket) -> None:
    """The handed socket must be bound where the mapping listens, of its protocol and family."""
    kind = socket.SOCK_STREAM if mapping.proto == "tcp" else socket.SOCK_DGRAM
    family = socket.AF_INET6 if mapping.listen_ip().version == 6 else socket.AF_INET
    if sock.family != family or sock.type != kind:
        raise BadInput(f"the socket handed over is not an IPv{mapping.listen_ip().version} {mapping.proto} socket")
    port = sock.getsockname()[1]
    if port != mapping.host_port:
        raise BadInput(f"the socket handed over is bound to port {port}, not {mapping.host_port}")


class DelegateServer:
    """The delegate socket of one daemon; see the module's docstring."""

    def __init__(self, controller: Controller, policy: PeerPolicy, path: Path, group: str | None) -> None:
        self.controller, self.policy, self.path, self.group = controller, policy, path, group
        self.loop = controller.loop
        self._sock: socket.socket | None = None
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False

    def start(self) -> None:
        """Bind and listen (mode 0660, root:group, as the control socket); OSError if it cannot."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            self.path.unlink(missing_ok=True)  # the control socket's lock, taken first, says it is ours
            old_umask = os.umask(0o117)
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old_umask)
            if self.group is not None:
                os.chown(self.path, -1, grp.getgrnam(self.group).gr_gid)
            sock.listen(1024)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._spawn(self._accept_loop())

    async def stop(self) -> None:
        """Stop accepting and close every connection (the controller then stops its mappings)."""
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self.path.unlink(missing_ok=True)

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = await self.loop.sock_accept(self._sock)
            except OSError as exc:  # EMFILE and the like: say so, wait, go on
                log.error("delegate socket: accept failed: %s", exc.strerror)
                await asyncio.sleep(0.5)
                continue
            conn.setblocking(False)
            self._spawn(self._serve(conn))

    async def _serve(self, conn: socket.socket) -> None:
        owner_id: str | None = None
        try:
            owner_id = await self._handle(conn)
            if owner_id is not None:
                while await _receive(self.loop, conn) is not None:
                    pass  # nothing more is expected; only the end of the connection matters
        finally:
            conn.close()
            if owner_id is not None and not self._stopping:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(self._release(owner_id))

    async def _release(self, owner_id: str) -> None:
        try:
            await self.controller.remove_owned(owner_id)
        except PortproxyError as exc:
            log.error("removing the mapping of docker-proxy %s failed: %s", owner_id, exc)

    async def _handle(self, conn: socket.socket) -> str | None:
        """Take the request, add the mapping, answer; the owner id if a mapping was added."""
        sockets: list[socket.socket] = []
        try:
            pid, uid, gid = peer_credentials(conn)
            if not self.policy.allows(uid, gid):
                log.warning("refused a delegation from uid %d", uid)
                raise BadInput(f"uid {uid} may not use this socket")
            try:
                received = await asyncio.wait_for(_receive(self.loop, conn), REQUEST_TIMEOUT)
            except asyncio.TimeoutError:
                raise BadInput(f"no request within {REQUEST_TIMEOUT:g} s") from None
            if received is None:
                return None
            data, fds, truncated = received
            sockets = [_socket_of(fd) for fd in fds]
            if truncated:
                raise BadInput(f"the request is larger than {MAX_MESSAGE} bytes or carries more than {MAX_FDS} fds")
            mapping, owner, settings = parse_request(data)
            if len(sockets) != 1:
                raise BadInput(f"the request must carry exactly one socket, not {len(sockets)}")
            check_namespace(sockets[0], pid)
            check_socket(mapping, sockets[0])
            if self.controller.has_owner(owner["id"]):
                raise Conflict(f"owner id {shorten(owner['id'], 80)} is in use: each connection needs its own")
            await self.controller.add(mapping, settings, origin="docker", owner=owner,
                                      sockets={mapping.host_port: sockets[0]})
        except PortproxyError as exc:
            for sock in sockets:
                sock.close()
            # A unix socket path is reachable from every network namespace, but this daemon serves
            # only its own: the other namespace's drop-in is told to serve in-process instead.
            _answer(conn, *((delegation.OTHER_NAMESPACE,) if isinstance(exc, OtherNamespace)
                            else (delegation.REFUSED, str(exc))))
            return None
        except OSError as exc:  # a peer that went away, an fd that is not a socket
            for sock in sockets:
                sock.close()
            _answer(conn, delegation.REFUSED, f"delegation failed: {exc.strerror or exc}")
            return None
        except Exception as exc:  # noqa: BLE001 - a bug: the drop-in still gets a line, the loop goes on
            log.exception("delegation failed")
            for sock in sockets:
                sock.close()
            _answer(conn, delegation.REFUSED, f"internal error: {shorten(repr(exc), 200)}")
            return None
        _answer(conn, delegation.OK)
        return owner["id"]


def _socket_of(fd: int) -> socket.socket:
    try:
        return socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        raise


async def _receive(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> tuple[bytes, list[int], bool] | None:
    """The next message (data, fds, truncated), or None at the end of the connection."""
    while True:
        try:
            data, fds, flags, _ = socket.recv_fds(conn, MAX_MESSAGE, MAX_FDS)
        except BlockingIOError:
            await _readable(loop, conn)
            continue
        except (ConnectionError, OSError):
            return None
        if not data and not fds:
            return None
        return data, fds, bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC))


async def _readable(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    ready = loop.create_future()
    fd = conn.fileno()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(fd)


def _answer(conn: socket.socket, kind: str, error: str = "") -> None:
    """One message back; a peer that is gone or not reading is not waited for."""
    with contextlib.suppress(OSError):
        conn.send(delegation.encode_answer(kind, error))
