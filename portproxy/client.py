"""CLI client verbs (``portproxy ls|add|rm|switch|reload``) over the control socket, with aiohttp."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import aiohttp


from .errors import PortproxyError


class ClientError(PortproxyError):
    """The daemon refused or could not be reached; the message is one line."""


async def _request(socket_path: str, method: str, path: str, **kwargs: Any) -> Any:
    try:
        async with aiohttp.UnixConnector(path=socket_path) as connector:
            async with aiohttp.ClientSession(connector=connector) as session:
                async with session.request(method, f"http://portproxy{path}", **kwargs) as response:
                    text = await response.text()
                    try:
                        body = json.loads(text)
                    except ValueError:
                        body = None
                    if not isinstance(body, dict):
                        raise ClientError(f"the daemon answered HTTP {response.status} without JSON: "
                                          f"{text.strip()[:200]!r}")
                    if response.status >= 400:
                        raise ClientError(str(body.get("error", f"HTTP {response.status}")))
                    return body
    except aiohttp.ClientConnectionError as exc:
        raise ClientError(f"cannot reach the daemon at {socket_path}: {exc.__cause__ or exc}") from None
    except aiohttp.ClientError as exc:
        raise ClientError(f"talking to the daemon at {socket_path} failed: {exc}") from None


def call(socket_path: str, method: str, path: str, **kwargs: Any) -> Any:
    return asyncio.run(_request(socket_path, method, path, **kwargs))


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.1f} TiB"


def owner_cell(owner: dict) -> str:
    """``KIND:NAME`` (or the id's first 12 characters); ``KIND:NAMESPACE/NAME`` for a pod, as
    two pods of one name in two namespaces are two owners."""
    name = owner.get("name")
    if name and owner.get("namespace"):
        name = f"{owner['namespace']}/{name}"
    return f"{owner.get('kind')}:{name or owner.get('id', '')[:12]}"


def format_table(mappings: list[dict]) -> str:
    rows = [("MAPPING", "MODE", "STATUS", "OWNER", "CONNS", "BYTES IN", "BYTES OUT", "KERNEL CONNS", "KERNEL BYTES")]
    notes = []
    for m in mappings:
        u = m.get("userland", {})
        k = m.get("kernel")
        owner = m.get("owner") or {}
        status = m.get("status", "running")
        if m.get("error"):
            notes.append(f"{m['spec']}: {m['error']}")
        elif "kernel" in m and k is None:
            status = "no-dnat"
            notes.append(f"{m['spec']}: {m.get('kernel_problem', 'not in the nft table')}")
        rows.append((
            m["spec"], m["mode"], status,
            owner_cell(owner) if owner else m.get("source", "-"),
            str(u.get("connections", 0)),
            _human_bytes(u.get("bytes_to_target", 0)), _human_bytes(u.get("bytes_to_client", 0)),
            str(k["connections"]) if k else "-", _human_bytes(k["bytes"]) if k else "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
    return "\n".join([table, *notes])


def run_client(args: Any) -> int:
    sock = args.socket
    try:
        if args.command == "ls":
            body = call(sock, "GET", "/v1/mappings")
            print(json.dumps(body, indent=2) if args.json else format_table(body["mappings"]))
            daemon = body.get("daemon") or {}
            if not args.json and daemon.get("state_save_error"):
                print(f"daemon: {daemon['state_save_error']} (serving on, retrying)")
            if not args.json and daemon.get("routing_problem"):
                print(f"daemon: transparent mode: {daemon['routing_problem']}")
        elif args.command == "add":
            body = call(sock, "POST", "/v1/mappings", json={"spec": args.spec, "mode": args.mode, **args.options})
            print(json.dumps(body) if args.json else f"added {body['spec']} ({body['mode']})")
        elif args.command == "rm":
            body = call(sock, "DELETE", "/v1/mappings", params={"name": args.name})
            print(json.dumps(body) if args.json else f"removed {body['removed']}")
        elif args.command == "switch":
            body = call(sock, "POST", "/v1/mappings/switch", json={"name": args.name, "mode": args.mode})
            print(json.dumps(body) if args.json else f"{body['spec']} is now {body['mode']}")
        elif args.command == "reload":
            body = call(sock, "POST", "/v1/reload")
            print(json.dumps(body, indent=None if args.json else 2))
    except ClientError as exc:
        print(f"portproxy: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `portproxy ls | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0
