"""``portproxy serve``: wire the controller, the control socket, metrics, systemd and signals together."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

from ..defaults import DEFAULT_CONFIG
from ..foreground import stop_signal
from ..metrics import DEFAULT_METRICS_ADDR, MappingCollector, start_metrics_server
from ..systemd import Notifier, listen_fds
from .api import PeerPolicy, build_app, serve_api
from .config import ConfigError, load_config
from .core import Controller
from .state import StateError, StateStore

log = logging.getLogger("portproxy")


def summary(controller: Controller) -> str:
    """One line for STATUS= and the ready line: how many mappings on which path."""
    modes = [e.mode for e in controller.entries.values()]
    parts = ", ".join(f"{modes.count(m)} {m}" for m in ("userland", "kernel", "hybrid") if modes.count(m))
    return f"{len(modes)} mapping(s){': ' + parts if parts else ''}; {controller.proxy.connection_count()} connection(s)"


async def run_serve(config_path: Path, state_dir: Path, socket_path: Path, metrics_arg: str | None = "config") -> int:
    loop = asyncio.get_running_loop()
    notifier = Notifier()
    passed = listen_fds()
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
    controller = Controller(loop, config.options, StateStore(state_dir))
    for sock in passed:
        proto, ip, port = controller.proxy.adopt(sock)
        log.info("adopted a passed %s socket on %s port %d", proto, ip, port)
    try:
        errors = await controller.start(config)
    except StateError as exc:
        print(f"portproxy: {exc}", file=sys.stderr)
        return 1
    unused = [key for key, sock in controller.proxy.adopted.items()
              if not any(listener.sock is sock for group in controller.proxy.listeners.values() for listener in group)]
    for proto, ip, port in unused:
        log.warning("a passed %s socket on %s port %d matches no mapping; it stays idle", proto, ip, port)

    async def reload() -> dict:
        notifier.reloading()
        try:
            new = load_config(config_path, missing_ok=config_path == DEFAULT_CONFIG)
        except ConfigError as exc:
            log.error("reload refused: %s", exc)
            notifier.ready(summary(controller))
            return {"error": str(exc)}
        report = await controller.reload(new)
        log.info("reloaded %s: %s", config_path, {k: len(v) for k, v in report.items()})
        notifier.ready(summary(controller))
        return report

    metrics_addr = (config.options.metrics_addr or DEFAULT_METRICS_ADDR) if metrics_arg == "config" else metrics_arg
    runner = None
    try:
        runner = await serve_api(build_app(controller, reload, policy), socket_path, config.options.socket_group)
        metrics = start_metrics_server(metrics_addr, MappingCollector(controller.metrics_snapshot)) \
            if metrics_addr else None
    except OSError as exc:
        where = metrics_addr if runner is not None else socket_path
        print(f"portproxy: cannot listen on {where}: {exc.strerror}", file=sys.stderr)
        if runner is not None:
            await runner.cleanup()
        await controller.stop(keep_kernel_rules=True)
        return 1
    controller.on_change = lambda: notifier.status(summary(controller))
    reloads: list[asyncio.Task] = []
    loop.add_signal_handler(signal.SIGHUP, lambda: reloads.append(loop.create_task(reload())))
    if errors:
        log.error("%d mapping(s) could not start", len(errors))
    # Every configured mapping that could start is accepting now: tell systemd, then the user.
    notifier.ready(summary(controller))
    print(f"ready {summary(controller)}; control socket {socket_path}", flush=True)
    watchdog = _start_watchdog(loop, notifier)

    signum = await stop
    notifier.stopping()
    log.info("%s: stopping; draining %d connection(s)", signal.Signals(signum).name, controller.proxy.connection_count())
    if watchdog is not None:
        watchdog.cancel()
    await runner.cleanup()
    if metrics is not None:
        metrics[0].shutdown()
    await controller.stop()
    try:
        socket_path.unlink()
    except FileNotFoundError:
        pass
    return 0


def _start_watchdog(loop: asyncio.AbstractEventLoop, notifier: Notifier) -> asyncio.Task | None:
    """WATCHDOG=1 every half WatchdogSec, from the event loop itself: a stuck loop stops the pings."""
    interval = notifier.watchdog_seconds
    if interval is None:
        return None

    async def ping() -> None:
        while True:
            notifier.watchdog()
            await asyncio.sleep(interval)

    return loop.create_task(ping())
