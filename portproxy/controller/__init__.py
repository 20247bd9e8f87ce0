"""The controller daemon (``portproxy serve``): all mappings in one process, a control API,
live switching between the userland and kernel paths, persistence.

Its names load on first use: ``portproxy map`` runs its mappings through
:mod:`.realiser` and :mod:`.plan` without loading the daemon."""

from __future__ import annotations

from typing import Any

__all__ = ["Config", "ConfigError", "Controller", "DaemonOptions", "load_config", "parse_config"]


def __getattr__(name: str) -> Any:
    if name == "Controller":
        from .core import Controller

        return Controller
    if name in __all__:
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
