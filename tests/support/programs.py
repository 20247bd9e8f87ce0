"""The programs the tests run beyond the benchmark's, through portproxy.debcache's one fetch
mechanism (``apt-get download`` + ``dpkg -x``, never installed: no service starts).

``python -m tests.support.programs`` fetches them all (setup.sh does, so the tests find
them without reaching the mirror).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from portproxy import debcache
from portproxy.debcache import Tool, ToolUnavailable

TOOLS: dict[str, Tool] = {
    **debcache.TOOLS,
    # The metrics tests: a real Prometheus scraping the endpoint, promtool checking the format.
    "prometheus": Tool("prometheus", "usr/bin/prometheus"),
    "promtool": Tool("prometheus", "usr/bin/promtool"),
    # The real-dockerd tests: dockerd, its containerd and runc, tini for --init, and
    # busybox-static for an image built without a registry.
    "dockerd": Tool("docker.io", "usr/sbin/dockerd", ("containerd", "runc", "tini", "busybox-static")),
    # The CNI tests: the reference plugins (portmap needs iptables), and podman 4.3.
    "cni-plugins": Tool("containernetworking-plugins", "usr/lib/cni/portmap", ("iptables",)),
    "podman": Tool("podman", "usr/bin/podman", ("conmon", "crun", "golang-github-containers-common", "libgpgme11",
                                                "libsubid4", "libyajl2", "busybox-static")),
}
"""Every program the tests and the benchmark run that portproxy itself does not need."""

CHECKOUT = Path(__file__).resolve().parents[2]

__all__ = ["TOOLS", "ToolUnavailable", "command", "tree", "main", "setup_sh_packages"]


def command(name: str, fetch: bool = True) -> list[str]:
    """The argv prefix that runs ``name`` from the cache (see :func:`portproxy.debcache.command`)."""
    return debcache.command(name, fetch, TOOLS)


def tree(name: str) -> Path:
    """The unpacked tree holding ``name``'s package and its libraries, fetched if needed."""
    command(name)
    return debcache.tree(TOOLS[name])


def main(argv: list[str] | None = None) -> int:
    return debcache.main(argv, TOOLS, prog="tests.support.programs")


def setup_sh_packages() -> list[str]:
    """The packages setup.sh hands to apt-get install."""
    text = (CHECKOUT / "setup.sh").read_text()
    lists = re.findall(r"(?ms)^[A-Z_]+_PACKAGES=\((.*?)\)", text)
    assert lists, "setup.sh declares its packages in *_PACKAGES=(...) arrays"
    return [name for body in lists for name in body.split()]


if __name__ == "__main__":
    sys.exit(main())
