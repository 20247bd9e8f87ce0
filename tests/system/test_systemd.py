"""The unit files, checked offline with systemd-analyze, and the config the package ships.

The unit at work (readiness, reload, watchdog, socket activation, hardening, stop, the
journal) is tested under a real systemd in tests/system/test_systemd_real.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
needs_systemd_tools = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")


def _units_with_real_binary(tmp_path: Path) -> list[Path]:
    """The shipped units with ExecStart pointing at this checkout's portproxy."""
    binary = Path(sys.executable).parent / "portproxy"
    out = []
    for name in ("portproxy.service", "portproxy.socket"):
        text = (ROOT / "systemd" / name).read_text().replace("/usr/local/bin/portproxy", str(binary))
        path = tmp_path / name
        path.write_text(text)
        out.append(path)
    return out


@needs_systemd_tools
def test_units_verify(tmp_path: Path) -> None:
    units = _units_with_real_binary(tmp_path)
    result = subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


@needs_systemd_tools
def test_security_exposure_at_most_3(tmp_path: Path) -> None:
    service = _units_with_real_binary(tmp_path)[0]
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(service)],
                            capture_output=True, text=True)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 3.0
