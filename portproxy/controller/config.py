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

Every problem is reported as one line naming the file, the entry and the reason.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from pathlib import Path
from typing import Any, Literal

from ..kernel.builders import KernelOptions
from ..proxy.options import ProxyOptions, congestion_control_error
from ..spec import Mapping, SpecError, check_no_overlap, parse_spec

Mode = Literal["userland", "kernel", "hybrid"]
MODES: tuple[Mode, ...] = ("userland", "kernel", "hybrid")


class ConfigError(Exception):
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


@dataclasses.dataclass(frozen=True)
class Config:
    options: DaemonOptions
    mappings: dict[Mapping, Mode]


_PROXY_KEYS = {"connect_timeout": float, "udp_timeout": float, "max_udp_flows": int, "drain_timeout": float,
               "splice": bool, "pipe_size": int}
_OTHER_KEYS = {"target_cc", "route_localnet", "masquerade", "set_sysctls", "keep_kernel_rules", "socket_group",
               "metrics_addr"}


def parse_mode(value: Any, where: str) -> Mode:
    if value not in MODES:
        raise ConfigError(f"{where}: mode {value!r} is not one of {', '.join(MODES)}")
    return value  # type: ignore[no-any-return]


def _options(raw: dict[str, Any], where: str) -> DaemonOptions:
    unknown = set(raw) - set(_PROXY_KEYS) - _OTHER_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown option {sorted(unknown)[0]!r}")
    proxy_kwargs: dict[str, Any] = {}
    for key, kind in _PROXY_KEYS.items():
        if key in raw:
            value = raw[key]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
                raise ConfigError(f"{where}: option {key!r} must be a {kind.__name__}")
            if kind is not bool and value < 0:
                raise ConfigError(f"{where}: option {key!r} must not be negative")
            proxy_kwargs[key] = value
    target_cc = raw.get("target_cc")
    if target_cc is not None:
        if not isinstance(target_cc, str):
            raise ConfigError(f"{where}: option 'target_cc' must be a string")
        error = congestion_control_error(target_cc)
        if error:
            raise ConfigError(f"{where}: {error}")
        proxy_kwargs["target_cc"] = target_cc
    masquerade = []
    for item in raw.get("masquerade", []):
        subnet, _, bridge = str(item).partition(",")
        try:
            ipaddress.ip_network(subnet, strict=False)
        except ValueError:
            raise ConfigError(f"{where}: masquerade {item!r} is not SUBNET,BRIDGE") from None
        if not bridge:
            raise ConfigError(f"{where}: masquerade {item!r} is not SUBNET,BRIDGE")
        masquerade.append((subnet, bridge))
    for key in ("route_localnet", "set_sysctls", "keep_kernel_rules"):
        if key in raw and not isinstance(raw[key], bool):
            raise ConfigError(f"{where}: option {key!r} must be true or false")
    return DaemonOptions(
        proxy=ProxyOptions(**proxy_kwargs),
        kernel=KernelOptions(route_localnet=raw.get("route_localnet", False), masquerade=tuple(masquerade)),
        set_sysctls=raw.get("set_sysctls", False),
        keep_kernel_rules=raw.get("keep_kernel_rules", False),
        socket_group=raw.get("socket_group"),
        metrics_addr=raw.get("metrics_addr"),
    )


def parse_config(text: str, where: str = "config") -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    unknown = set(raw) - {"options", "mapping"}
    if unknown:
        raise ConfigError(f"{where}: unknown section {sorted(unknown)[0]!r}")
    options = _options(raw.get("options", {}), where)
    mappings: dict[Mapping, Mode] = {}
    for i, entry in enumerate(raw.get("mapping", [])):
        entry_where = f"{where}: mapping #{i + 1}"
        if not isinstance(entry, dict) or "spec" not in entry:
            raise ConfigError(f"{entry_where}: needs a spec")
        try:
            mapping = parse_spec(entry["spec"])
        except SpecError as exc:
            raise ConfigError(f"{entry_where}: {exc}") from None
        mappings[mapping] = parse_mode(entry.get("mode", "userland"), entry_where)
    try:
        check_no_overlap(list(mappings))
    except SpecError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return Config(options, mappings)


def load_config(path: Path, missing_ok: bool = True) -> Config:
    """Read the config file; with ``missing_ok``, no file means no options and no mappings."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        if missing_ok:
            return Config(DaemonOptions(), {})
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    return parse_config(text, str(path))
