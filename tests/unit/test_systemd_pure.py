"""The shipped config and the journal log format, without systemd."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_config_serves_nothing_and_its_examples_parse() -> None:
    """The file the package installs as /etc/portproxy/portproxy.toml publishes no port; its
    commented-out mappings are valid once uncommented."""
    from portproxy.controller.config import parse_config

    text = (ROOT / "systemd" / "portproxy.toml").read_text()
    assert parse_config(text).mappings == {}
    uncommented = re.sub(r"(?m)^# (\[\[mapping\]\]|spec =|mode =)", r"\1", text)
    config = parse_config(uncommented)
    assert {m.host_port: s.mode for m, s in config.mappings.items()} == {9090: "userland", 5353: "kernel"}


def test_journal_log_format(tmp_path: Path) -> None:
    """With stderr being the journal stream: `<priority>` prefixes, no timestamps."""
    log_path = tmp_path / "stderr"
    with open(log_path, "w") as stderr:
        st = os.fstat(stderr.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        subprocess.run([sys.executable, "-c", "from portproxy.runtime import setup_logging; import logging; "
                        "setup_logging('debug'); logging.getLogger('portproxy').warning('careful'); "
                        "logging.getLogger('portproxy').error('broken')"],
                       stderr=stderr, env=env, check=True, timeout=30)
    assert log_path.read_text().splitlines() == ["<4>portproxy: careful", "<3>portproxy: broken"]
