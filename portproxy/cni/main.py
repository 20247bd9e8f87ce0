"""``portproxy-cni``: one CNI command per process (ADD, DEL, CHECK, VERSION, GC, STATUS).

Whatever goes wrong, the runtime gets CNI error JSON on stdout and exit status 1, never
a traceback. Diagnostics that are not errors go to stderr, which runtimes log.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, TextIO

from .protocol import (ERR_INTERNAL, ERR_INVALID_CONFIG, ERR_NOT_AVAILABLE, ERR_TRY_AGAIN, SUPPORTED_VERSIONS, CniError,
                       Config, Env, check_version, container_addresses, decode, error_json, mappings_for, owner_of,
                       go_get, go_key, parse_config, parse_env, result_for)
from .versions import version_json


OPENED: list[Any] = []
"""Every backend this process opened, kept until it exits: :func:`main` ends with
``os._exit`` right after the answer, so neither libnftables' context (~11 ms to free its
cache) nor the interpreter (~14 ms) is torn down while the runtime waits for the exit."""


def backend_for(env: Env, conf: Config) -> Any:
    """Where mappings go: the ``portproxy serve`` of this network namespace when its control
    socket is there (:mod:`.with_daemon`), else the plugin's own table (:mod:`.table`)."""
    from .with_daemon import connect, socket_path

    backend = connect(socket_path(env, conf), conf)
    if backend is None:
        from .table import NftBackend, options

        backend = NftBackend(options(conf))
    OPENED.append(backend)
    return backend


def own_table(conf: Config) -> Any:
    from .table import NftBackend, options

    table = NftBackend(options(conf))
    OPENED.append(table)
    return table


def _everywhere(env: Env, conf: Config, remove: Callable[[Any], Any]) -> Any:
    """DEL and GC with a daemon also clear the plugin's own table: a mapping written there
    before the daemon ran, or while it was starting (after it read the table to adopt it),
    would otherwise outlive its container. Returns the backend that was asked."""
    from .with_daemon import DaemonBackend

    backend = backend_for(env, conf)
    if isinstance(backend, DaemonBackend):
        remove(own_table(conf))
    remove(backend)
    return backend


def _chained(conf: Config, what: str) -> dict:
    if conf.prev_result is None:
        raise CniError(ERR_INVALID_CONFIG, what)
    return conf.prev_result


def cmd_add(env: Env, conf: Config) -> dict | None:
    prev = _chained(conf, "must be called as chained plugin")
    addresses = container_addresses(prev, env.ifname)
    mappings = mappings_for(conf.port_mappings, addresses)
    if mappings:
        from .with_daemon import DaemonBackend

        backend = backend_for(env, conf)
        backend.add(owner_of(env, conf), mappings)
        if not isinstance(backend, DaemonBackend):  # the daemon does both itself
            _after_add(conf, addresses, mappings)
    return result_for(prev, conf.cni_version)


def _after_add(conf: Config, addresses: list, mappings: list) -> None:
    """What the rules depend on, as portmap does it: route_localnet towards the container
    (loopback clients), and no stale UDP conntrack entry left to bypass the new DNAT."""
    from .table import enable_route_localnet

    if conf.snat:
        for address in addresses:
            if address.version == 4:
                enable_route_localnet(address)
    udp = sorted({(m.host_port, m.host_port_end) for m in mappings if m.proto == "udp"})
    if udp:
        from ..kernel import conntrack

        try:
            conntrack.delete_udp_flows(udp)
        except Exception as exc:  # noqa: BLE001 - informative only, as in portmap
            print(f"portproxy-cni: failed to delete stale UDP conntrack entries: {exc}", file=sys.stderr)


def cmd_del(env: Env, conf: Config) -> None:
    """Needs neither prevResult nor the netns: the table (or the daemon) knows what this
    attachment owns. When no daemon takes the DEL, a daemon that saved mappings here is
    told when it is back (:mod:`.departures`): when its socket is gone (stopped), or there
    and dead (crashed; the DEL then succeeds). Not for a daemon that is merely busy, one
    of another namespace, or a network with daemon mode off."""
    from .with_daemon import DaemonAway, socket_path
    from .table import NftBackend

    owner = owner_of(env, conf)
    try:
        backend = _everywhere(env, conf, lambda backend: backend.remove(owner))
    except DaemonAway as exc:
        table = own_table(conf)
        table.remove(owner)
        if _tell_the_absent_daemon(env, conf, owner, table):
            print(f"portproxy-cni: {exc.msg}; the daemon will drop {owner.container_id[:12]}'s mappings "
                  "when it starts", file=sys.stderr)
        else:  # it never held CNI mappings (no departures table): nothing of this container is there
            print(f"portproxy-cni: {exc.msg}; it held no CNI mapping, the DEL is complete", file=sys.stderr)
        return
    path = socket_path(env, conf)
    if isinstance(backend, NftBackend) and path is not None and not os.path.lexists(path):
        _tell_the_absent_daemon(env, conf, owner, backend)


def _tell_the_absent_daemon(env: Env, conf: Config, owner: Any, table: Any) -> bool:
    """Leave word for a daemon holding CNI mappings that is away (False: there is none), and
    take this attachment's DNAT out of its table if it was kept meanwhile: the runtime gives
    the address to the next container now, not when the daemon is back. That needs
    ``prevResult`` (the container's addresses), which runtimes pass to DEL.

    A daemon that came back meanwhile (its socket is there again, and it holds its table's
    lock from before it reads the words) is left alone and the runtime told to try again,
    which then reaches it. Nothing else here fails the DEL: the word is left, and the
    daemon acts on it when it starts."""
    from .with_daemon import socket_path

    if not table.leave_word(owner):
        return False
    if table.daemon_table_locked():
        path = socket_path(env, conf)
        if path is not None and os.path.lexists(path):
            raise CniError(ERR_TRY_AGAIN, f"the portproxy daemon at {path} is starting", "try the DEL again")
        return True  # another holder (a foreground `portproxy map`): not ours to edit
    try:
        if conf.prev_result is not None and conf.port_mappings:
            from .with_daemon import api_mappings

            mappings = mappings_for(conf.port_mappings, container_addresses(conf.prev_result, env.ifname))
            if table.withdraw_kept(api_mappings(mappings)):
                print(f"portproxy-cni: took {owner.container_id[:12]}'s DNAT out of the absent daemon's table",
                      file=sys.stderr)
    except CniError as exc:
        print(f"portproxy-cni: leaving the DNAT in the absent daemon's table to it: {exc.msg}", file=sys.stderr)
    return True


def cmd_check(env: Env, conf: Config) -> None:
    prev = _chained(conf, "required prevResult missing")
    mappings = mappings_for(conf.port_mappings, container_addresses(prev, env.ifname))
    if mappings:
        backend_for(env, conf).check(owner_of(env, conf), mappings)


def cmd_gc(env: Env, conf: Config) -> None:
    """GC needs the daemon: its saved attachments are known to it alone. While it is away
    (stopped: socket gone; crashed: DaemonAway) the plugin's own table is collected, and
    the runtime is told to try again (code 11) rather than that everything was collected."""
    from .with_daemon import DaemonAway, socket_path
    from .table import NftBackend

    collect: Callable[[Any], Any] = lambda backend: backend.gc(conf.name, set(conf.valid_attachments))  # noqa: E731
    try:
        backend = _everywhere(env, conf, collect)
    except DaemonAway:
        collect(own_table(conf))
        raise
    path = socket_path(env, conf)
    if (isinstance(backend, NftBackend) and path is not None and not os.path.lexists(path)
            and backend.daemon_expects_word()):
        raise CniError(ERR_TRY_AGAIN, f"the portproxy daemon ({path}) is away: its mappings were not collected",
                       "GC again once it runs")


def cmd_status(env: Env, conf: Config) -> None:
    """Ready for ADDs: the daemon (if one is configured and there) answers as portproxy does,
    or libnftables can be used for the plugin's own table."""
    try:
        backend_for(env, conf).ready()
    except CniError as exc:
        raise CniError(ERR_NOT_AVAILABLE, "plugin not available", exc.msg) from None


COMMANDS: dict[str, Callable[[Env, Config], dict | None]] = {
    "ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "GC": cmd_gc, "STATUS": cmd_status,
}


def _config_for(command: str, raw: dict) -> Config:
    """The configuration. DEL and GC drop port mappings that would be refused, with a line on
    stderr: they need the owner, not the ports, and a container an older, laxer build
    ADDed must still go."""
    try:
        return parse_config(raw)
    except CniError as exc:
        runtime_key = go_key(raw, "runtimeConfig")
        runtime = raw.get(runtime_key) if runtime_key else None
        mappings_key = go_key(runtime, "portMappings") if isinstance(runtime, dict) else None
        if command not in ("DEL", "GC") or mappings_key is None:
            raise
        conf = parse_config({**raw, runtime_key: {k: v for k, v in runtime.items() if k != mappings_key}})
        print(f"portproxy-cni: {command} without the port mappings: {exc.msg}", file=sys.stderr)
        return conf


def run(environ: dict[str, str] | os._Environ, stdin: bytes, out: TextIO) -> int:
    """Run one CNI command; write its result or error to ``out``; return the exit status."""
    version = SUPPORTED_VERSIONS[-1]
    try:
        env = parse_env(environ)
        if env.command == "VERSION":
            requested = decode(stdin).get("cniVersion") if stdin.strip() else None
            json.dump(version_json(requested if isinstance(requested, str) else None), out)
            return 0
        raw = decode(stdin)
        requested = go_get(raw, "cniVersion")
        if isinstance(requested, str) and requested in SUPPORTED_VERSIONS:
            version = requested
        check_version(raw)
        result = COMMANDS[env.command](env, _config_for(env.command, raw))
        if result is not None:
            json.dump(result, out)
        return 0
    except CniError as exc:
        json.dump(error_json(exc, version), out)
        return 1
    except Exception as exc:  # noqa: BLE001 - the runtime must get CNI JSON, not a traceback
        json.dump(error_json(CniError(ERR_INTERNAL, f"unexpected error: {type(exc).__name__}: {exc}"), version), out)
        return 1


def main() -> None:
    try:
        stdin = sys.stdin.buffer.read()
    except OSError:
        stdin = b""
    code = run(os.environ, stdin, sys.stdout)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # the runtime closed the pipe: nobody is left to tell
            code = code or 1
    os._exit(code)  # see OPENED


if __name__ == "__main__":
    main()
