"""``portproxy serve``: wire the controller, the control socket, metrics, systemd and signals together.

Every failure at start is one line on stderr and a non-zero exit (the error's own
status), with nothing left behind: no socket unlinked that another daemon owns, no
DNAT installed by a daemon that then failed to come up.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from ..defaults import DEFAULT_CONFIG
from ..errors import PortproxyError, SystemFailure
from ..map_command import stop_signal
from ..metrics import DEFAULT_METRICS_ADDR, MappingCollector, start_metrics_server
from ..systemd import Notifier, listen_fds
from .api import PeerPolicy, build_app, serve_api
from .config import load_config
from .core import Controller
from ..lock import take_lock
from .delegate import DelegateServer, delegate_path
from .state import StateStore

log = logging.getLogger("portproxy")


async def run_serve(config_path: Path, state_dir: Path, socket_path: Path, metrics_arg: str | None = "config") -> int:
    try:
        return await _serve(config_path, state_dir, socket_path, metrics_arg)
    except PortproxyError as exc:
        print(f"portproxy: {exc}", file=sys.stderr)
        return exc.exit_status


async def _serve(config_path: Path, state_dir: Path, socket_path: Path, metrics_arg: str | None) -> int:
    loop = asyncio.get_running_loop()
    notifier = Notifier()
    config = load_config(config_path, missing_ok=config_path == DEFAULT_CONFIG)
    policy = PeerPolicy(config.options.socket_group)
    _locks = [take_lock(socket_path.with_name(socket_path.name + ".lock"), f"the control socket {socket_path}"),
             take_lock(state_dir / "lock", f"the state directory {state_dir}")]
    store = StateStore(state_dir)
    store.load()  # unreadable state: refuse now, before anything runs (and never overwrite it)
    metrics_addr = (config.options.metrics_addr or DEFAULT_METRICS_ADDR) if metrics_arg == "config" else metrics_arg
    if metrics_addr == "off":
        metrics_addr = None
    stop = stop_signal()
    controller = Controller(loop, config.options, store)
    runner = metrics = None
    delegate = DelegateServer(controller, policy, delegate_path(socket_path), config.options.socket_group)
    try:
        # Everything that can refuse for a reason of its own comes before the mappings start.
        runner = await _serve_api(controller, policy, socket_path, config.options.socket_group,
                                  lambda: reload(controller, config_path, notifier))
        _start_delegate(delegate)
        if metrics_addr:
            metrics = _start_metrics(metrics_addr, controller)
        for sock in listen_fds():
            proto, ip, port = controller.adopt_socket(sock)
            log.info("adopted a passed %s socket on %s port %d", proto, ip, port)
        errors = await controller.start(config)
    except BaseException:
        if runner is not None:
            await runner.cleanup()
            socket_path.unlink(missing_ok=True)
        await delegate.stop()
        if metrics is not None:
            metrics[0].shutdown()
        await controller.stop(keep_kernel_rules=True)
        raise
    for error in errors:
        log.error("not running: %s", error)
    controller.on_change = lambda: notifier.status(controller.summary())
    reloads: set[asyncio.Task] = set()

    def on_sighup() -> None:
        task = loop.create_task(reload(controller, config_path, notifier))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    # Every configured mapping that could start is accepting now: tell systemd, then the user.
    notifier.ready(controller.summary())
    print(f"ready {controller.summary()}; control socket {socket_path}", flush=True)
    watchdog = _start_watchdog(loop, notifier)

    signum = await stop
    notifier.stopping()
    log.info("%s: stopping; draining %d connection(s)", signal.Signals(signum).name, controller.connection_count())
    if watchdog is not None:
        watchdog.cancel()
    await runner.cleanup()
    await delegate.stop()
    if metrics is not None:
        metrics[0].shutdown()
    await controller.stop()
    socket_path.unlink(missing_ok=True)
    return 0


async def reload(controller: Controller, config_path: Path, notifier: Notifier) -> dict[str, Any]:
    """SIGHUP and POST /v1/reload: re-read the config, apply the difference, report.

    Whatever happens, RELOADING=1 is followed by READY=1, and every failure is logged
    (a task nobody awaits must not swallow it)."""
    async with _RELOADS:  # one at a time: SIGHUP storms and concurrent API calls queue up
        return await _reload(controller, config_path, notifier)


_RELOADS = asyncio.Lock()


async def _reload(controller: Controller, config_path: Path, notifier: Notifier) -> dict[str, Any]:
    notifier.reloading()
    try:
        new = load_config(config_path, missing_ok=config_path == DEFAULT_CONFIG)
        report = await controller.reload(new)
    except PortproxyError as exc:
        log.error("reload refused: %s", exc)
        return {"errors": [str(exc)], "status": exc.http_status}
    except Exception as exc:  # noqa: BLE001 - a reload must never die silently
        log.exception("reload failed")
        return {"errors": [f"internal error: {exc}"]}
    finally:
        notifier.ready(controller.summary())
    counts = {k: len(v) for k, v in report.items()}
    (log.error if report.get("errors") else log.info)("reloaded %s: %s", config_path, counts)
    return report


async def _serve_api(controller: Controller, policy: PeerPolicy, path: Path, group: str | None, reload_fn: Any):
    try:
        return await serve_api(build_app(controller, reload_fn, policy), path, group)
    except OSError as exc:
        raise SystemFailure(f"cannot listen on {path}: {exc.strerror or exc}") from None


def _start_delegate(delegate: DelegateServer) -> None:
    try:
        delegate.start()
    except OSError as exc:
        raise SystemFailure(f"cannot listen on {delegate.path}: {exc.strerror or exc}") from None


def _start_metrics(addr: str, controller: Controller) -> Any:
    try:
        return start_metrics_server(addr, MappingCollector(controller.metrics_snapshot, controller.daemon_counters))
    except OSError as exc:
        raise SystemFailure(f"cannot serve metrics on {addr}: {exc.strerror}") from None


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
