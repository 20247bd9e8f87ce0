"""``portproxy serve``: wire the controller, the control socket and the signals together."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

from ..foreground import stop_signal
from ..metrics import DEFAULT_METRICS_ADDR, MappingCollector, start_metrics_server
from .api import PeerPolicy, build_app, serve_api
from .config import ConfigError, load_config
from .core import Controller
from .state import StateError, StateStore

log = logging.getLogger("portproxy")

DEFAULT_CONFIG = Path("/etc/portproxy/portproxy.toml")
DEFAULT_STATE_DIR = Path("/var/lib/portproxy")
DEFAULT_SOCKET = Path("/run/portproxy/portproxy.sock")


async def run_serve(config_path: Path, state_dir: Path, socket_path: Path, metrics_arg: str | None = "config") -> int:
    loop = asyncio.get_running_loop()
    try:
        config = load_config(config_path, missing_ok=config_path == DEFAULT_CONFIG)
        policy = PeerPolicy(config.options.socket_group)
    except ConfigError as exc:
        print(f"portproxy: {exc}", file=sys.stderr)
        return 2
    except KeyError:
        print(f"portproxy: socket group {config.options.socket_group!r} does not exist", file=sys.stderr)
        return 2
    stop = stop_signal()
    reloads: list[asyncio.Task] = []
    controller = Controller(loop, config.options, StateStore(state_dir))
    try:
        errors = await controller.start(config)
    except StateError as exc:
        print(f"portproxy: {exc}", file=sys.stderr)
        return 1
    current = {"config": config}

    async def reload() -> dict:
        try:
            new = load_config(config_path, missing_ok=config_path == DEFAULT_CONFIG)
        except ConfigError as exc:
            log.error("reload refused: %s", exc)
            return {"error": str(exc)}
        report = await controller.reload(new)
        current["config"] = new
        log.info("reloaded %s: %s", config_path, {k: len(v) for k, v in report.items()})
        return report

    loop.add_signal_handler(signal.SIGHUP, lambda: reloads.append(loop.create_task(reload())))
    metrics_addr = (config.options.metrics_addr or DEFAULT_METRICS_ADDR) if metrics_arg == "config" else metrics_arg
    try:
        runner = await serve_api(build_app(controller, reload, policy), socket_path, config.options.socket_group)
        metrics = start_metrics_server(metrics_addr, MappingCollector(controller.metrics_snapshot)) \
            if metrics_addr else None
    except OSError as exc:
        where = socket_path if "runner" not in locals() else metrics_addr
        print(f"portproxy: cannot listen on {where}: {exc.strerror}", file=sys.stderr)
        await controller.stop(keep_kernel_rules=True)
        return 1
    modes = [e.mode for e in controller.entries.values()]
    summary = ", ".join(f"{modes.count(m)} {m}" for m in ("userland", "kernel", "hybrid") if modes.count(m))
    print(f"ready {len(modes)} mapping(s){': ' + summary if summary else ''}; control socket {socket_path}",
          flush=True)
    if errors:
        log.error("%d mapping(s) could not start", len(errors))

    signum = await stop
    log.info("%s: stopping; draining %d connection(s)", signal.Signals(signum).name, controller.proxy.connection_count())
    await runner.cleanup()
    if metrics is not None:
        metrics[0].shutdown()
    await controller.stop()
    try:
        socket_path.unlink()
    except FileNotFoundError:
        pass
    return 0
