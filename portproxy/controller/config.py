"""The daemon's TOML configuration (stdlib ``tomllib``): global options and mappings with their mode.

Example (``/etc/portproxy/portproxy.toml``)::

    [options]
    connect_timeout = 5
    udp_timeout = 90
    drain_timeout = 10
    target_cc = "cubic"      # congestion control toward the targets (default: the system's)
    masquerade = ["172.16.0.0/16,br0"]
    socket_group = "portproxy"

    [[mapping]]
    spec = "9090:172.16.1.1:8080"
    mode = "userland"        # userland (default) | kernel | hybrid
    connect_timeout = 2      # per-mapping options override [options]

Every key and value is checked by the one options schema (:mod:`portproxy.schema`):
a value ``portproxy map`` refuses is refused here, an unknown key is an error, and
every problem is one line naming the file, the entry and the reason.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .. import schema
from ..errors import BadInput, shorten
from ..kernel.builders import KernelOptions
from ..schema import Mode
from ..proxy.options import ProxyOptions
from ..spec import Mapping, SpecError, check_no_overlap, parse_spec



class ConfigError(BadInput):
    """The configuration cannot be used; the message is one line."""


@dataclasses.dataclass(frozen=True)
class DaemonOptions:
    proxy: ProxyOptions = ProxyOptions()
    kernel: KernelOptions = KernelOptions()
    set_sysctls: bool = False
    keep_kernel_rules: bool = False
    """Leave the kernel rules in place on stop, for a restart without a gap."""
    socket_group: str | None = None
    metrics_addr: str | None = None
    values: tuple[tuple[str, Any], ...] = ()
    """The checked values as given, to tell what a reload changes."""


def daemon_options(values: dict[str, Any]) -> DaemonOptions:
    return DaemonOptions(
        proxy=schema.proxy_options(values),
        kernel=schema.kernel_options(values),
        set_sysctls=values.get("set_sysctls", False),
        keep_kernel_rules=values.get("keep_kernel_rules", False),
        socket_group=values.get("socket_group"),
        metrics_addr=values.get("metrics_addr"),
        values=tuple(sorted(values.items())),
    )


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the operator asked of one mapping: its mode and the options it overrides."""

    mode: Mode = "userland"
    overrides: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> "Settings":
        overrides = tuple(sorted((k, v) for k, v in values.items() if k != "mode"))
        return cls(values.get("mode", "userland"), overrides)


@dataclasses.dataclass(frozen=True)
class Config:
    options: DaemonOptions
    mappings: dict[Mapping, Settings]


def parse_mapping_entry(entry: Any, where: str) -> tuple[Mapping, Settings]:
    """One ``[[mapping]]`` table or API body: ``spec`` plus per-mapping options."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a table with a spec")
    spec = entry.get("spec")
    if not isinstance(spec, str):
        raise ConfigError(f"{where}: needs a spec (a string), got {shorten(spec)}")
    try:
        mapping = parse_spec(spec)
        values = schema.check_table(entry, schema.MAPPING, where, ignore=("spec",))
    except SpecError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except BadInput as exc:
        raise ConfigError(str(exc)) from None
    return mapping, Settings.from_values(values)


def parse_config(text: str, where: str = "config") -> Config:
    import tomllib  # here: portproxy map uses DaemonOptions and never reads a config

    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    unknown = sorted(set(raw) - {"options", "mapping"})
    if unknown:
        raise ConfigError(f"{where}: unknown section{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(repr(k) for k in unknown)} (expected [options] and [[mapping]])")
    try:
        values = schema.check_table(raw.get("options", {}), schema.DAEMON, f"{where}: [options]")
    except BadInput as exc:
        raise ConfigError(str(exc)) from None
    entries = raw.get("mapping", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: 'mapping' must be an array of tables ([[mapping]])")
    mappings: dict[Mapping, Settings] = {}
    for i, entry in enumerate(entries):
        mapping, settings = parse_mapping_entry(entry, f"{where}: mapping #{i + 1}")
        mappings[mapping] = settings
    try:
        check_no_overlap(list(mappings))
    except SpecError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return Config(daemon_options(values), mappings)


def load_config(path: Path, missing_ok: bool = True) -> Config:
    """Read the config file; with ``missing_ok``, no file means no options and no mappings."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        if missing_ok:
            return Config(DaemonOptions(), {})
        raise ConfigError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    return parse_config(text, str(path))
