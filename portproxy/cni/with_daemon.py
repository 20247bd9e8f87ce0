"""Mappings registered with a running ``portproxy serve`` (the plugin's "with a daemon" mode).

When the daemon's control socket is there, the plugin does not write a table of its own:
it asks the daemon, which then shows the container's mappings in ``portproxy ls`` and the
metrics, persists them across its restarts, and keeps them in its one table. Each CNI
mapping becomes one API mapping per address family (``0.0.0.0:`` or ``[::]:`` when the
runtime gave no ``hostIP``), mode ``kernel``, owned by
``{"kind": "cni", "id": CNI_CONTAINERID, "ifname", "network", "name"?, "namespace"?}``.
ADD and DEL are one request each whatever the number of ports: ``PUT /v1/owners/mappings``
declares the attachment's whole set (``[]`` on DEL), which the daemon applies in one nft
transaction, all or nothing, so a refused ADD needs no undo here.

Which socket: the network configuration's ``daemonSocket`` (``""`` turns daemon mode off),
else ``$PORTPROXY_SOCKET`` (runtimes pass a small environment, so the conflist is the
reliable place), else :data:`~portproxy.defaults.DEFAULT_SOCKET`.

- No socket file (or something else at that path, said on stderr): daemonless (:class:`~portproxy.cni.table.NftBackend`); a daemon that
  starts later adopts that table (:mod:`.adopt`).
- A socket whose daemon runs in another network namespace: not ours to use (its table
  is elsewhere), so daemonless too.
- A socket that does not answer: an error (code 11, try again), never a silent fallback:
  the daemon removes its socket when it stops, so a dead socket means a crashed daemon
  whose saved state still holds mappings, and writing the other table then would split
  one container's state between two owners that do not know of each other. A DEL is the
  exception: it leaves word for the daemon (:mod:`.departures`) and succeeds.

Talks HTTP/1.1 over the unix socket with a dozen lines of its own (:func:`exchange`), not
``http.client``: the plugin starts for every container, and importing ``http.client``
(it brings the ``email`` package) took 20 ms, more than the request. That is enough here
because the other end is always portproxy's own API: one request per connection
(``Connection: close``), JSON answers with a Content-Length, read to the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import stat
import sys
import time
from typing import Any, Callable

from ..netident import in_own_netns, peer_credentials
from ..spec import WILDCARDS, Mapping
from .protocol import (ERR_CHECK_FAILED, ERR_INVALID_CONFIG, ERR_IO, ERR_PORT_TAKEN, ERR_TRY_AGAIN,
                       ERR_UNSUPPORTED_FIELD, CniError, Config, Env, Owner, gc_doomed)

TIMEOUT = 60.0
"""Seconds for one request: a daemon busy with a large change answers late, not never."""


def socket_path(env: Env, conf: Config) -> str | None:
    """The daemon socket to use, or None for daemon mode turned off by ``"daemonSocket": ""``."""
    if conf.daemon_socket is not None:
        return conf.daemon_socket or None
    if env.portproxy_socket:
        return env.portproxy_socket
    from ..defaults import DEFAULT_SOCKET  # pathlib: 2-7 ms of a start that rarely needs it

    return str(DEFAULT_SOCKET)


def _peer_netns_differs(sock: socket.socket) -> bool:
    """Whether the process at the other end runs in another network namespace than this one
    (False when that cannot be told: a peer outside this pid namespace counts as ours)."""
    try:
        pid = peer_credentials(sock)[0]
        return pid > 0 and not in_own_netns(pid=pid)
    except OSError:
        return False


MAX_ANSWER = 64 * 1024 * 1024
"""A listing of 65,535 mappings is a few tens of MB; anything larger is not an answer."""


def exchange(sock: socket.socket, method: str, target: str, body: bytes | None,
             timeout: float = TIMEOUT) -> tuple[int, bytes]:
    """One HTTP/1.1 request on a fresh connection to portproxy's API: (status, body), all of
    it within ``timeout`` seconds (a peer trickling bytes must not hold a container's start)."""
    head = f"{method} {target} HTTP/1.1\r\nHost: portproxy\r\nConnection: close\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    size = 0
    try:
        sock.settimeout(timeout)
        sock.sendall(head.encode() + b"\r\n" + (body or b""))
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_ANSWER:
                raise OSError("the answer is too large")
        else:
            raise TimeoutError
    except TimeoutError:
        raise TimeoutError(f"no complete answer within {timeout:g} s") from None
    status_line, _, rest = b"".join(chunks).partition(b"\r\n")
    headers, _, payload = rest.partition(b"\r\n\r\n")
    fields = status_line.split(b" ", 2)
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/1.") or not fields[1].isdigit():
        raise OSError(f"not an HTTP answer: {status_line[:60]!r}")
    lengths = [line.split(b":", 1)[1].strip() for line in headers.lower().split(b"\r\n")
               if line.startswith(b"content-length:")]
    if len(lengths) != 1 or not lengths[0].isdigit():
        raise OSError("an answer without one Content-Length (not portproxy's API?)")
    if int(lengths[0]) != len(payload):
        raise OSError(f"the answer was cut short ({len(payload)} of {int(lengths[0])} bytes)")
    return int(fields[1]), payload


class DaemonAway(CniError):
    """The daemon's socket is there and nobody answers it: the daemon crashed (it removes
    its socket when it stops). Only this, not a busy daemon or a lock, lets a DEL succeed
    by leaving word for it (:mod:`.departures`)."""


def connect(path: str | None, conf: Config) -> "DaemonBackend | None":
    """A backend talking to the daemon at ``path``; None when there is none for this namespace."""
    if path is None:
        return None
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            print(f"portproxy-cni: {path} is not a socket; writing table inet portproxy_cni instead "
                  "(no portproxy daemon there)", file=sys.stderr)
            return None
    except OSError:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise DaemonAway(ERR_TRY_AGAIN, f"the portproxy daemon at {path} does not answer: {exc.strerror}",
                       "its socket exists, so it crashed or is starting; start it (or remove the stale socket "
                       "to go daemonless)") from None
    if _peer_netns_differs(sock):
        sock.close()
        print(f"portproxy-cni: the daemon at {path} runs in another network namespace; "
              "writing table inet portproxy_cni instead", file=sys.stderr)
        return None
    return DaemonBackend(path, sock, conf)


def api_mappings(mappings: list[Mapping]) -> list[Mapping]:
    """Each CNI mapping as the daemon takes it: one family each, with an explicit host address.

    Without a host address the API's spec means Docker's ``-p`` (both families); a CNI
    runtime publishes only the container's families, and ``mappings_for`` already made
    one mapping per container address, so each gets its family's wildcard."""
    return [m if m.host_ip is not None else dataclasses.replace(m, host_ip=WILDCARDS[m.family]) for m in mappings]


def owner_token(owner: dict[str, Any]) -> str | None:
    """The table token of an API owner object, or None if it is not a CNI attachment."""
    if not isinstance(owner, dict) or owner.get("kind") != "cni":
        return None
    return Owner.from_controller(owner).token()


class DaemonBackend:
    """The four operations of :class:`~portproxy.cni.table.NftBackend`, through the daemon's API."""

    def __init__(self, path: str, sock: socket.socket, conf: Config) -> None:
        self.path = path
        self.conf = conf
        self.sock: socket.socket | None = sock
        """The connection made to check the peer's namespace: the first request's."""

    def request(self, method: str, target: str, body: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        sock, self.sock = self.sock, None
        try:
            if sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(TIMEOUT)
                sock.connect(self.path)
            with sock:
                status, text = exchange(sock, method, target, data)
        except OSError as exc:
            raise CniError(ERR_TRY_AGAIN, f"talking to the portproxy daemon at {self.path} failed: {exc}") from None
        try:
            answer = json.loads(text)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise CniError(ERR_IO, f"the portproxy daemon answered HTTP {status} without JSON")
        return status, answer

    def _ok(self, method: str, target: str, body: dict | None = None) -> dict:
        status, answer = self.request(method, target, body)
        if status >= 400:
            code = {409: ERR_PORT_TAKEN, 400: ERR_INVALID_CONFIG}.get(status, ERR_IO)
            raise CniError(code, f"portproxy daemon: {answer.get('error', f'HTTP {status}')}")
        return answer

    def ready(self) -> None:
        """STATUS: a server that accepts connections is not enough; it must answer as portproxy."""
        answer = self._ok("GET", "/v1/health")
        if not isinstance(answer.get("mappings"), int):
            raise CniError(ERR_IO, f"the server at {self.path} does not answer as a portproxy daemon")

    def listing(self) -> list[dict]:
        return self._ok("GET", "/v1/mappings").get("mappings", [])

    def owned(self, doomed: Callable[[str], bool]) -> list[dict]:
        """The daemon's CNI mappings whose owner's token ``doomed`` accepts."""
        return [m for m in self.listing() if (t := owner_token(m.get("owner"))) is not None and doomed(t)]

    def declare(self, owner: dict[str, Any], mappings: list[Mapping]) -> None:
        """Make ``mappings`` the whole set of ``owner`` in the daemon: one request, one nft
        transaction, all or nothing (``PUT /v1/owners/mappings``; a refusal changes nothing)."""
        answer = self._ok("PUT", "/v1/owners/mappings",
                          {"owner": owner, "mappings": [{"spec": str(m), "mode": "kernel"} for m in mappings]})
        if not all(isinstance(answer.get(key), list) for key in ("added", "removed", "kept")):
            raise CniError(ERR_IO, f"the server at {self.path} answered without a declared set: not a portproxy "
                           "daemon (or one too old for this plugin)")

    # --- the operations of both backends ------------------------------------------------------
    def add(self, owner: Owner, mappings: list[Mapping]) -> None:
        """Register ``mappings`` for ``owner``, replacing what it had.

        ``snat``, ``masqAll`` and conditions are properties of a whole table: with a daemon,
        its table's (always masquerading hairpin and host-originated flows, loopback with
        its ``route_localnet`` option). A network asking for something else is refused
        rather than silently served differently."""
        conf = self.conf
        unsupported = [name for name, off in (("snat: false", not conf.snat), ("masqAll", conf.masq_all),
                                              ("conditionsV4/V6", bool(conf.conditions))) if off]
        if unsupported:
            raise CniError(ERR_UNSUPPORTED_FIELD, f"{', '.join(unsupported)}: with a portproxy daemon "
                           f"({self.path}) the daemon's table settings apply to every mapping",
                           "remove the option from the network configuration, or set daemonSocket to \"\"")
        self.declare(owner.controller_owner(), api_mappings(mappings))

    def remove(self, owner: Owner) -> None:
        """DEL: the attachment's mappings go (none is fine: DEL is idempotent)."""
        self.declare(owner.controller_owner(), [])

    def check(self, owner: Owner, mappings: list[Mapping]) -> None:
        """Raise unless the daemon runs every mapping of ``owner``, with its DNAT in the table."""
        have = {m["spec"]: m for m in self.owned(lambda t: t == owner.token())}
        for m in api_mappings(mappings):
            got = have.get(str(m))
            if got is None or got.get("status") != "running" or not got.get("kernel"):
                why = "missing" if got is None else got.get("error") or got.get("kernel_problem") or got.get("status")
                raise CniError(ERR_CHECK_FAILED, f"mapping {m} is not running in the portproxy daemon: {why}")

    def gc(self, network: str, keep: set[tuple[str, str]]) -> int:
        """Remove every attachment of ``network`` not in ``keep``: one request per attachment."""
        doomed = {json.dumps(m["owner"], sort_keys=True): m["owner"]
                  for m in self.owned(lambda token: gc_doomed(token, network, keep))}
        for owner in doomed.values():
            self.declare(owner, [])
        return len(doomed)
