"""The CNI versions this plugin speaks, and its VERSION answer (no imports beyond the stdlib's json)."""

from __future__ import annotations

SUPPORTED_VERSIONS = ("0.4.0", "1.0.0", "1.1.0")
"""Also in the launcher (scripts/portproxy-docker-proxy), which answers VERSION by itself;
tests/test_cni_protocol.py checks that the two agree."""


def version_json(requested: str | None) -> dict:
    """VERSION's output: the requested version echoed when supported, and the supported list."""
    return {"cniVersion": requested if requested in SUPPORTED_VERSIONS else SUPPORTED_VERSIONS[-1],
            "supportedVersions": list(SUPPORTED_VERSIONS)}
