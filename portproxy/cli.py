"""The ``portproxy`` command line: argument parsing and dispatch, nothing else.

Every failure the user can cause ends in one line on stderr and a non-zero exit:
2 for a malformed command line or mapping spec (nothing was started), 1 for a
mapping that could not be started (port in use, missing capability, nft error).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__, schema
from .schema import MODES
from .spec import SpecError, parse_specs


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="event loop (default uvloop)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")


PROXY_FLAGS = ("connect_timeout", "udp_timeout", "max_udp_flows", "drain_timeout", "splice", "pipe_size", "target_cc")
SOURCE_FLAGS = ("proxy_protocol", "source", "transparent_mark", "transparent_table")
"""How the target learns the client's address (docs/client-address.md)."""
KERNEL_FLAGS = ("route_localnet", "masquerade", "set_sysctls")
AUTO_FLAGS = ("auto_bytes_per_second", "auto_connections_per_second", "auto_cool_seconds")


def _metrics_addr(text: str) -> str | None:
    if text == "config":
        return text  # serve: take the config file's metrics_addr
    value = schema.argparse_type("metrics_addr")(text)
    return None if value == "off" else value


def kernel_options_from(args: argparse.Namespace) -> "KernelOptions":  # noqa: F821
    return schema.kernel_options(schema.given(args, KERNEL_FLAGS))


def proxy_options_from(args: argparse.Namespace) -> "ProxyOptions":  # noqa: F821
    return schema.proxy_options(schema.given(args, PROXY_FLAGS + SOURCE_FLAGS))


def transparent_options_from(args: argparse.Namespace) -> "TransparentOptions | None":  # noqa: F821
    """The routing transparent mode needs, or None without ``--source client``."""
    given = schema.given(args, SOURCE_FLAGS)
    return schema.transparent_options(given) if given.get("source") == "client" else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="portproxy",
        description="Port mapping for Linux containers: zero-copy userland proxy and nftables kernel path.",
    )
    parser.add_argument("--version", action="version", version=f"portproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_map = sub.add_parser(
        "map",
        help="run mappings in the foreground",
        description="Run mappings in the foreground until SIGINT/SIGTERM. "
        "SPEC: [HOST_IP:]HOST_PORT[-END]:TARGET_IP:TARGET_PORT[-END][/tcp|/udp]",
    )
    p_map.add_argument("specs", nargs="+", metavar="SPEC")
    p_map.add_argument("--mode", choices=("userland", "kernel", "auto"), default="userland",
                       help="userland proxy (default), nftables DNAT, or auto: userland while light, "
                       "moving itself to DNAT (and back) with its load")
    schema.add_arguments(p_map.add_argument_group("userland proxy"), PROXY_FLAGS)
    schema.add_arguments(p_map.add_argument_group("client address at the target (userland path)"), SOURCE_FLAGS)
    schema.add_arguments(p_map.add_argument_group("kernel path"), KERNEL_FLAGS)
    schema.add_arguments(p_map.add_argument_group("auto mode"), AUTO_FLAGS)
    p_map.add_argument("--metrics-addr", type=_metrics_addr, nargs="?", const="127.0.0.1:9779", default=None,
                       metavar="HOST:PORT", help="serve Prometheus metrics (off by default; without a value "
                       "127.0.0.1:9779)")
    add_runtime_options(p_map)

    p_demo = sub.add_parser("demo", help="build a client, a host and a container in namespaces and show a mapping at work")
    add_runtime_options(p_demo)

    p_bench = sub.add_parser("bench", help="benchmark both paths against direct routing and peer proxies",
                             description=(
        "Build a client → host → container topology in namespaces of its own, publish iperf3, sockperf "
        "and nginx through every path (direct routing, the kernel path, portproxy's userland variants, "
        "docker-proxy, HAProxy, socat where present), run every workload round by round, measure memory, "
        "and write bench.json, bench.md and bench.png."))
    from .bench.arguments import add_arguments as add_bench_arguments

    add_bench_arguments(p_bench)
    p_bench.add_argument("--log-level", default="warning", help=argparse.SUPPRESS)

    from .defaults import DEFAULT_CONFIG, DEFAULT_SOCKET, DEFAULT_STATE_DIR

    p_serve = sub.add_parser("serve", help="run the controller daemon", description=(
        "Run every mapping of the config file and of the saved state in one process, with a control "
        "socket for ls/add/rm/switch. SIGHUP reloads the config; SIGTERM/SIGINT drain and stop."))
    p_serve.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"TOML config (default {DEFAULT_CONFIG})")
    p_serve.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                         help=f"where state is persisted (default {DEFAULT_STATE_DIR})")
    p_serve.add_argument("--socket", type=Path, default=DEFAULT_SOCKET, help=f"control socket (default {DEFAULT_SOCKET})")
    p_serve.add_argument("--metrics-addr", type=_metrics_addr, default="config", metavar="HOST:PORT|off",
                         help="Prometheus metrics address (default: the config's metrics_addr, else 127.0.0.1:9779)")
    add_runtime_options(p_serve)

    socket_default = os.environ.get("PORTPROXY_SOCKET", str(DEFAULT_SOCKET))

    def client(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--socket", default=socket_default, help="control socket (default $PORTPROXY_SOCKET or "
                       f"{DEFAULT_SOCKET})")
        p.add_argument("--json", action="store_true", help="print the daemon's JSON answer")
        return p

    client("ls", "list the daemon's mappings")
    p_add = client("add", "add a mapping to the daemon")
    p_add.add_argument("spec", metavar="SPEC")
    p_add.add_argument("--mode", choices=MODES, default=MODES[0])
    schema.add_arguments(p_add.add_argument_group("per-mapping options (override the daemon's)"),
                          [name for name in schema.names(schema.MAPPING) if name != "mode"])
    p_rm = client("rm", "remove a mapping (by spec or HOST_PORT[/PROTO])")
    p_rm.add_argument("name", metavar="SPEC")
    p_switch = client("switch", f"switch a mapping between {', '.join(MODES[:-1])} and {MODES[-1]}, live")
    p_switch.add_argument("name", metavar="SPEC")
    p_switch.add_argument("--mode", choices=MODES, required=True)
    client("reload", "make the daemon re-read its config file")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("ls", "add", "rm", "switch", "reload"):
        from .client import run_client

        if args.command == "add":
            args.options = schema.given(args, [n for n in schema.names(schema.MAPPING) if n != "mode"])
        return run_client(args)
    from .runtime import raise_fd_limit, run, setup_logging

    setup_logging(args.log_level)
    if args.command == "map":
        try:
            mappings = parse_specs(args.specs)
        except SpecError as exc:
            print(f"portproxy: {exc}", file=sys.stderr)
            return 2
        from .map_command import run_kernel, run_userland
        from .proxy.proxy_protocol import refusal

        for error in {refusal(m.proto, args.mode, args.proxy_protocol) for m in mappings} - {None}:
            print(f"portproxy: {error}", file=sys.stderr)
            return 2
        raise_fd_limit()  # the kernel path holds every published port too
        if args.mode == "auto":
            from .map_command import run_auto

            return run(lambda: run_auto(mappings, proxy_options_from(args), kernel_options_from(args),
                                        bool(args.set_sysctls), schema.auto_thresholds(schema.given(args, AUTO_FLAGS)),
                                        metrics_addr=args.metrics_addr, transparent=transparent_options_from(args)),
                       args.loop)
        if args.mode == "kernel":
            return run(lambda: run_kernel(mappings, kernel_options_from(args), bool(args.set_sysctls),
                                          metrics_addr=args.metrics_addr, proxy_options=proxy_options_from(args)),
                       args.loop)
        return run(lambda: run_userland(mappings, proxy_options_from(args), metrics_addr=args.metrics_addr,
                                        transparent=transparent_options_from(args)), args.loop)
    if args.command == "serve":
        from .controller.serve import run_serve

        raise_fd_limit()
        return run(lambda: run_serve(args.config, args.state_dir, args.socket, args.metrics_addr), args.loop)
    if args.command == "bench":
        from .bench.run import main as run_bench

        return run_bench(args)
    if args.command == "demo":
        from .lab.demo import run_demo

        return run_demo(loop=args.loop)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
