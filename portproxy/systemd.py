"""The two systemd protocols the daemon speaks, written against sd_notify(3) and
sd_listen_fds(3): no maintained pure-Python library covers both (systemd-python needs
libsystemd headers to build; sdnotify has been unmaintained since 2017), and each is a
few lines over a plain socket.

* :class:`Notifier` sends ``READY=1``, ``RELOADING=1``, ``STOPPING=1``, ``STATUS=...`` and
  ``WATCHDOG=1`` datagrams to ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
  namespace). Without ``$NOTIFY_SOCKET`` every call does nothing.
* :func:`listen_fds` adopts the sockets systemd passed (``$LISTEN_FDS`` from fd 3 on,
  for ``$LISTEN_PID`` only), so ports can be held across restarts.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("portproxy.systemd")

SD_LISTEN_FDS_START = 3


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address: str | None = None
        if address:
            self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        self.watchdog_seconds = self._watchdog_interval(env)

    @staticmethod
    def _watchdog_interval(env: dict[str, str]) -> float | None:
        """Half of WatchdogSec, as systemd recommends; None when no watchdog is asked for."""
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 1e6 / 2
        except ValueError:
            return None

    def notify(self, *fields: str) -> None:
        """Send ``fields`` as one datagram; failures are logged once per call, never raised."""
        if self._address is None:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:
            log.warning("sd_notify to %r failed: %s", self._address, exc)

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def reloading(self) -> None:
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}", "STATUS=reloading the configuration")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=draining connections")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")


def listen_fds(unset_environment: bool = True, environ: dict[str, str] | None = None) -> list[socket.socket]:
    """Sockets passed by systemd (socket activation), as socket objects, in fd order."""
    env = os.environ if environ is None else environ
    try:
        pid = int(env.get("LISTEN_PID", "0"))
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    if unset_environment:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(key, None)
    if pid != os.getpid() or count <= 0:
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        try:
            sockets.append(socket.socket(fileno=fd))
        except OSError as exc:
            log.warning("passed fd %d is not a socket: %s", fd, exc)
    return sockets
