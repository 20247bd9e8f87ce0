"""The docker-proxy drop-in as dockerd runs it, for the tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

DROPIN = str(Path(sys.executable).parent / "portproxy-docker-proxy")


class DockerProxy:
    """One drop-in process started the way dockerd does it."""

    def __init__(self, ns, args: list[str], listen_sock: socket.socket | None = None,
                 env: dict[str, str] | None = None, fd3: int | None = None, fd4: int | None = None) -> None:
        """fd 3 is a status pipe unless ``fd3`` gives another fd (or -1: none at all); fd 4 is
        ``listen_sock`` or ``fd4``."""
        status_r, status_w = os.pipe() if fd3 is None else (None, None)
        fds = {3: status_w} if status_w is not None else ({3: fd3} if fd3 != -1 else {})
        if listen_sock is not None:
            fds[4] = listen_sock.fileno()
        elif fd4 is not None:
            fds[4] = fd4
        self.proc = ns.popen([DROPIN, *args], fds=fds, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **(env or {})})
        self.status = b""
        if listen_sock is not None:
            listen_sock.close()  # the child has its own copy, as with dockerd
        if status_w is not None:
            os.close(status_w)
            with os.fdopen(status_r, "rb") as status:
                self.status = status.read()  # returns when the child closes fd 3

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def flags(proto: str, host_ip: str, host_port: int, container_ip: str, container_port: int) -> list[str]:
    return ["-proto", proto, "-host-ip", host_ip, "-host-port", str(host_port),
            "-container-ip", container_ip, "-container-port", str(container_port)]
