"""A ``portproxy`` command run as a real process inside a namespace, its output collected."""

from __future__ import annotations

import subprocess
import sys
import threading

from portproxy.lab.namespaces import Namespace


class PortproxyProcess:
    """A ``portproxy`` command running inside a namespace, with its output collected."""

    def __init__(self, ns: Namespace, args: list[str], ready_lines: int | None, prefix: list[str] | None = None) -> None:
        self.args = args
        self.proc = ns.popen(
            [*(prefix or []), sys.executable, "-m", "portproxy", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.ready: list[str] = []
        self.stderr_lines: list[str] = []
        self._stderr_thread = threading.Thread(target=self._collect_stderr, daemon=True)
        self._stderr_thread.start()
        if ready_lines:
            assert self.proc.stdout is not None
            while len(self.ready) < ready_lines:
                line = self.proc.stdout.readline()
                if not line:
                    self.proc.wait(timeout=10)
                    self._stderr_thread.join(timeout=5)
                    raise AssertionError(
                        f"portproxy {' '.join(args)} exited {self.proc.returncode}: {''.join(self.stderr_lines)}"
                    )
                if line.startswith("ready"):
                    self.ready.append(line.strip())

    def _collect_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._stderr_thread.join(timeout=5)
        return code


def run_portproxy(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    """``portproxy ARGS`` run to completion in this namespace, its output captured."""
    return subprocess.run([sys.executable, "-m", "portproxy", *args], capture_output=True, text=True, timeout=timeout)
