"""``portproxy-docker-proxy``: a drop-in for Docker's docker-proxy (daemon.json ``userland-proxy-path``).

dockerd starts one proxy per published port with Go-style flags and waits on fd 3:

    portproxy-docker-proxy -proto tcp -host-ip 0.0.0.0 -host-port 9090 \\
        -container-ip 172.17.0.2 -container-port 80 [-use-listen-fd]

* readiness: ``0\\n`` on fd 3 once listening, or ``1\\n`` and the error text on failure;
  then fd 3 is closed (docker-proxy's contract);
* ``-use-listen-fd``: the socket dockerd already bound (and, for TCP, listens on) is fd 4;
* exits on SIGINT/SIGTERM; ``-v``/``-version`` prints the version.

dockerd passes only those flags, so portproxy's own tunables come from the environment
dockerd runs in (``Environment=`` in a drop-in for docker.service):
``PORTPROXY_TARGET_CC`` is ``--target-cc``, the congestion control toward the container.

Flags follow Go's flag package: ``-x v``, ``-x=v``, ``--x``, ``--x=v``; parsing stops at
``--`` or the first non-flag argument.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import sys
from typing import TYPE_CHECKING, Callable

from . import __version__

if TYPE_CHECKING:
    from .proxy.options import ProxyOptions

STATUS_FD = 3
LISTEN_FD = 4
TARGET_CC_ENV = "PORTPROXY_TARGET_CC"

_VALUE_FLAGS: dict[str, str] = {
    "proto": "tcp", "host-ip": "", "host-port": "-1", "container-ip": "", "container-port": "-1",
}
_BOOL_FLAGS = {"use-listen-fd", "v", "version"}


class UsageError(Exception):
    """A command line Go's flag package would refuse (exit status 2)."""


def parse_go_flags(argv: list[str]) -> dict[str, str | bool]:
    values: dict[str, str | bool] = dict(_VALUE_FLAGS)
    values.update({name: False for name in _BOOL_FLAGS})
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-":
            break
        name = arg.lstrip("-") if arg.startswith("--") else arg[1:]
        if arg.startswith("---") or not name:
            raise UsageError(f"bad flag syntax: {arg}")
        name, eq, value = name.partition("=")
        if name in _BOOL_FLAGS:
            if eq:
                if value.lower() not in ("1", "0", "t", "f", "true", "false"):
                    raise UsageError(f'invalid boolean value "{value}" for -{name}')
                values[name] = value.lower() in ("1", "t", "true")
            else:
                values[name] = True
        elif name in _VALUE_FLAGS:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"flag needs an argument: -{name}")
                value = argv[i]
            values[name] = value
        else:
            raise UsageError(f"flag provided but not defined: -{name}")
        i += 1
    return values


def _mapping(flags: dict[str, str | bool]):  # noqa: ANN202 - Mapping
    from .spec import Mapping

    proto = str(flags["proto"])
    if proto not in ("tcp", "udp", "sctp"):
        raise ValueError(f"unsupported protocol {proto}")
    try:
        host_ip = ipaddress.ip_address(str(flags["host-ip"]))
        container_ip = ipaddress.ip_address(str(flags["container-ip"]))
    except ValueError as exc:
        raise ValueError(f"invalid address: {exc}") from None
    try:
        host_port, container_port = int(str(flags["host-port"])), int(str(flags["container-port"]))
    except ValueError:
        raise ValueError("ports must be numbers") from None
    if not (0 < host_port < 65536 and 0 < container_port < 65536):
        raise ValueError(f"invalid port: host {host_port}, container {container_port}")
    if proto == "sctp":
        try:
            socket.socket(socket.AF_INET6 if host_ip.version == 6 else socket.AF_INET, socket.SOCK_STREAM,
                          socket.IPPROTO_SCTP).close()
        except OSError as exc:
            raise ValueError(f"sctp: this kernel does not support SCTP ({exc.strerror})") from None
        raise ValueError("sctp: not supported by portproxy-docker-proxy; use Docker's docker-proxy for SCTP ports")
    return Mapping(proto, host_ip, host_port, host_port, container_ip, container_port, container_port)  # type: ignore[arg-type]


def _reporter() -> Callable[[str | None], None]:
    """Write docker-proxy's status to fd 3 once (if dockerd gave us one), then close it."""
    done = [False]

    def report(error: str | None) -> None:
        if done[0]:
            return
        done[0] = True
        try:
            os.fstat(STATUS_FD)
        except OSError:
            return
        try:
            os.write(STATUS_FD, b"0\n" if error is None else f"1\n{error}".encode())
        except OSError:
            pass
        finally:
            try:
                os.close(STATUS_FD)
            except OSError:
                pass

    return report


def _options_from_environment() -> ProxyOptions:
    """docker-proxy's fixed behaviour plus what the environment asks for; ValueError if bad."""
    from .proxy.options import ProxyOptions, congestion_control_error

    target_cc = os.environ.get(TARGET_CC_ENV) or None
    if target_cc is not None:
        error = congestion_control_error(target_cc)
        if error is not None:
            raise ValueError(f"{TARGET_CC_ENV}: {error}")
    return ProxyOptions(drain_timeout=0, target_cc=target_cc)


async def _serve(mapping, options: ProxyOptions, use_listen_fd: bool,  # noqa: ANN001
                 report: Callable[[str | None], None]) -> int:
    from .foreground import stop_signal
    from .proxy import ProxyServer
    from .proxy.server import ProxyError

    stop = stop_signal()
    server = ProxyServer(asyncio.get_running_loop(), options)
    sockets = {}
    if use_listen_fd:
        try:
            sockets[mapping.host_port] = socket.socket(fileno=LISTEN_FD)
        except OSError as exc:
            report(f"-use-listen-fd: fd {LISTEN_FD} is not a socket: {exc.strerror}")
            return 1
    try:
        server.add(mapping, sockets)
    except ProxyError as exc:
        report(str(exc))
        return 1
    report(None)
    await stop
    await server.stop(drain_timeout=0)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    report = _reporter()
    try:
        flags = parse_go_flags(args)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        report(str(exc))
        return 2
    if flags["v"] or flags["version"]:
        print(f"portproxy-docker-proxy (portproxy {__version__})")
        return 0
    try:
        mapping = _mapping(flags)
        options = _options_from_environment()
    except ValueError as exc:
        print(f"portproxy-docker-proxy: {exc}", file=sys.stderr)
        report(str(exc))
        return 1
    from .runtime import raise_fd_limit, run, setup_logging

    setup_logging("warning")
    raise_fd_limit()
    return run(lambda: _serve(mapping, options, bool(flags["use-listen-fd"]), report))


if __name__ == "__main__":
    sys.exit(main())
