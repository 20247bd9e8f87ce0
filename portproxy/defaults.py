"""Where the daemon looks for things by default (the paths the systemd unit provides).

Kept apart from the daemon so that the CLI can show them without importing the
daemon's dependencies: every ``portproxy map`` process would otherwise carry
aiohttp and pyroute2 in its resident memory.
"""

from pathlib import Path

DEFAULT_CONFIG = Path("/etc/portproxy/portproxy.toml")
DEFAULT_STATE_DIR = Path("/var/lib/portproxy")
DEFAULT_SOCKET = Path("/run/portproxy/portproxy.sock")
