"""The control API: HTTP/JSON over a unix socket (aiohttp), as Docker's is, so curl works:

    curl --unix-socket /run/portproxy/portproxy.sock http://portproxy/v1/mappings

=======  ===========================  =========================================
GET      /v1/mappings                 list, with mode, counters, live connections;
                                      ``daemon``: whether the state is saved
POST     /v1/mappings                 {"spec": "...", "mode": "userland"} → 201
DELETE   /v1/mappings?name=NAME       NAME: full spec or HOST_PORT[/PROTO]
POST     /v1/mappings/switch          {"name": "...", "mode": "kernel"}
PUT      /v1/owners/mappings          {"owner": {...}, "mappings": [...]}: a CNI
                                      owner's whole set, one kernel transaction
POST     /v1/reload                   re-read the config file, apply the difference
GET      /v1/health                   cheap: mapping counts, failed ones, the
                                      last problem found with the nft table, a
                                      failing save of the state
=======  ===========================  =========================================

A POST body takes the same keys as a ``[[mapping]]`` table of the config (``spec``,
``mode`` and per-mapping options, checked by the one options schema), plus ``owner``
for mappings a container engine adds (``DELETE /v1/mappings?owner=ID`` removes all of
one owner's, and answers 200 when there are none: a runtime's DEL is idempotent).

``PUT /v1/owners/mappings`` declares the set of one CNI owner (``{"kind": "cni", "id",
"ifname", "network"}`` name it; ``name`` and ``namespace`` are display fields, updated):
afterwards that owner's mappings are exactly ``mappings`` (each a POST body without
``owner``; ``[]`` removes them all, 200 even when there were none). Mappings with the
same spec and settings are kept untouched (DNAT, kernel id, counters), the owner's
others removed, new ones added, all in one nft transaction and one state write, all or
nothing: an overlap with any other mapping is 409, bad input 400, an nft failure 500,
and then nothing changed. Mode ``kernel`` only (a CNI runtime holds the host ports
itself: no listener to open); userland and hybrid mappings are added one by one with
POST. Answer: ``{"added": [spec...], "removed": [...], "kept": [...]}`` (a spec whose
options changed is in both removed and added). Its body may be up to
:data:`MAX_BATCH_BODY` (1,000 scattered ports are ~64 KiB of JSON, all of them ~10 MiB); others up to
:data:`MAX_BODY`; larger is 413.

Errors come back as ``{"error": "one line"}`` with the status the error's class
carries (:mod:`portproxy.errors`): 400 (bad input), 403 (peer not allowed), 404
(unknown mapping or path), 405 (method), 409 (conflict: port in use, overlap,
ambiguous name), 500/503 (nft or system failure). The socket is created mode 0660,
owned by root and an optional group; each peer's credentials (SO_PEERCRED) are checked.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import pwd
import socket
import stat
import struct
from pathlib import Path
from typing import Awaitable, Callable

from aiohttp import web

from ..errors import BadInput, PortproxyError
from .config import parse_mapping_entry
from .core import Controller
from .entry import origin_of

log = logging.getLogger("portproxy.api")

ReloadFn = Callable[[], Awaitable[dict]]
MAX_BODY = 64 * 1024
MAX_BATCH_BODY = 16 * 1024 * 1024
"""Every port of a host, scattered, dual-stack (131,070 mappings) is ~10 MiB of JSON."""


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", data)


class PeerPolicy:
    """Root, the daemon's own user, and members of the socket's group may talk to it."""

    def __init__(self, group: str | None) -> None:
        self.gid: int | None = None
        self.members: set[str] = set()
        if group is not None:
            entry = grp.getgrnam(group)
            self.gid = entry.gr_gid
            self.members = set(entry.gr_mem)

    def allows(self, uid: int, gid: int) -> bool:
        if uid in (0, os.geteuid()):
            return True
        if self.gid is None:
            return False
        if gid == self.gid:
            return True
        try:
            return pwd.getpwuid(uid).pw_name in self.members
        except KeyError:
            return False


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _json_body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise BadInput("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise BadInput("the request body must be a JSON object")
    return body


def _field(body: dict, key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise BadInput(f"field {key!r} is missing or not a string")
    return value


def build_app(controller: Controller, reload: ReloadFn, policy: PeerPolicy) -> web.Application:
    @web.middleware
    async def guard(request: web.Request, handler: Callable) -> web.StreamResponse:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None and sock.family == socket.AF_UNIX:
            _pid, uid, gid = peer_credentials(sock)
            if not policy.allows(uid, gid):
                log.warning("refused a control request from uid %d", uid)
                return _error(403, f"uid {uid} may not use this socket")
        try:
            return await handler(request)
        except PortproxyError as exc:
            return _error(exc.http_status, str(exc))
        except web.HTTPException as exc:  # unknown path, wrong method, body too large: JSON too
            if exc.status < 400:
                raise
            return _error(exc.status, exc.reason)

    async def health(request: web.Request) -> web.Response:
        """What a probe needs without the listing's cost (no kernel counters are read)."""
        return web.json_response(controller.health())

    async def list_mappings(request: web.Request) -> web.Response:
        return web.json_response({"mappings": await controller.describe(), "daemon": controller.daemon_status()})

    async def add_mapping(request: web.Request) -> web.Response:
        body = await _json_body(request)
        owner = body.pop("owner", None)
        mapping, settings = parse_mapping_entry(body, "request")
        origin = origin_of(owner) if isinstance(owner, dict) else "api"
        mapping = await controller.add(mapping, settings, origin=origin, owner=owner)
        return web.json_response({"spec": str(mapping), "mode": controller.mode_of(mapping)}, status=201)

    async def remove_mapping(request: web.Request) -> web.Response:
        owner = request.query.get("owner")
        if owner:
            removed = await controller.remove_owned(owner)
            return web.json_response({"removed": [str(m) for m in removed]})
        name = request.query.get("name")
        if not name:
            raise BadInput("query parameter 'name' (or 'owner') is missing")
        mapping = await controller.remove(name)
        return web.json_response({"removed": str(mapping)})

    async def switch_mapping(request: web.Request) -> web.Response:
        body = await _json_body(request)
        unknown = sorted(set(body) - {"name", "mode"})
        if unknown:
            raise BadInput(f"unknown field(s) {', '.join(map(repr, unknown))}")
        mapping = await controller.switch(_field(body, "name"), _field(body, "mode"))
        return web.json_response({"spec": str(mapping), "mode": controller.mode_of(mapping)})

    async def declare_owned(request: web.Request) -> web.Response:
        body = await _json_body(request.clone(client_max_size=MAX_BATCH_BODY))
        unknown = sorted(set(body) - {"owner", "mappings"})
        if unknown:
            raise BadInput(f"unknown field(s) {', '.join(map(repr, unknown))}")
        entries = body.get("mappings")
        if not isinstance(entries, list):
            raise BadInput("field 'mappings' is missing or not a list")
        wanted = [parse_mapping_entry(entry, f"mapping #{i + 1}") for i, entry in enumerate(entries)]
        return web.json_response(await controller.declare_owned(body.get("owner"), wanted))

    async def reload_config(request: web.Request) -> web.Response:
        report = await reload()
        if report.get("errors"):
            first = report["errors"][0]
            more = f" (and {len(report['errors']) - 1} more)" if len(report["errors"]) > 1 else ""
            status = report.pop("status", 500)
            return web.json_response({**report, "error": f"reload: {first}{more}"}, status=status)
        return web.json_response(report)

    app = web.Application(middlewares=[guard], client_max_size=MAX_BODY)
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/mappings", list_mappings)
    app.router.add_post("/v1/mappings", add_mapping)
    app.router.add_delete("/v1/mappings", remove_mapping)
    app.router.add_post("/v1/mappings/switch", switch_mapping)
    app.router.add_put("/v1/owners/mappings", declare_owned)
    app.router.add_post("/v1/reload", reload_config)
    return app


async def serve_api(app: web.Application, path: Path, group: str | None) -> web.AppRunner:
    """Listen on the unix socket ``path`` (mode 0660, root:group)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if not stat.S_ISSOCK(path.lstat().st_mode):
            # A typo must not cost the operator a file (--socket pointing at the config).
            raise BadInput(f"{path} exists and is not a socket; refusing to replace it")
        path.unlink()  # a stale socket (the lock says no live daemon uses it)
    except FileNotFoundError:
        pass
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.UnixSite(runner, str(path))
    old_umask = os.umask(0o117)
    try:
        await site.start()
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o660)
    if group is not None:
        # Group only: needs no CAP_CHOWN when the daemon is a member (SupplementaryGroups=).
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    return runner
