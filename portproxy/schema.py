"""The one options schema: every tunable, once, with its type, bounds, default and help.

argparse flags (``portproxy map``), the daemon's TOML (``[options]`` and each
``[[mapping]]``), the docker-proxy drop-in's environment (``PORTPROXY_*``) and the
control API's fields are all checked here, so a value refused in one place is refused
in all, and an unknown key is an error everywhere with one line naming it.

An option's *scopes* say where it may appear: ``global`` (``[options]``, command-line
flags), ``mapping`` (a ``[[mapping]]`` table or an API request, overriding the global
value for that mapping), ``daemon`` (``[options]`` of ``portproxy serve`` only).
Values come in two shapes: typed (TOML, JSON) and text (flags, environment);
:func:`check` takes either and returns the typed value or raises :class:`BadInput`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
from typing import Any, Callable, Iterable, Literal, Mapping as MappingType, get_args

from .errors import BadInput, shorten

Mode = Literal["userland", "kernel", "hybrid", "auto"]
"""The paths a mapping can be on, written once: the CLI's choices, the schema's, the
daemon's and the metrics' labels all come from here. The first is the default."""
MODES: tuple[Mode, ...] = get_args(Mode)
MODE_HELP: dict[Mode, str] = {
    "userland": "userland proxy",
    "kernel": "kernel DNAT",
    "hybrid": "hybrid (DNAT + a proxy for local clients)",
    "auto": "auto (userland while light, hybrid while hot)",
}
"""What each mode is, for help texts (one entry per mode, in the order of MODES)."""

Check = Callable[[Any], "str | None"]


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    kind: type
    default: Any
    help: str
    scopes: frozenset[str] = frozenset({"global"})
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    """Exclusive lower bound (``> above``)."""
    choices: tuple[str, ...] | None = None
    check: Check | None = None
    """Extra validation of a typed value: the reason it is refused, or None."""
    repeated: bool = False
    """A list of ``kind`` (TOML array; a repeatable flag)."""
    metavar: str | None = None
    env: str | None = None
    """The drop-in's environment variable for it, if any."""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


# --- checks ----------------------------------------------------------------------------

def _congestion_control(value: str) -> str | None:
    from .proxy.options import congestion_control_error

    error = congestion_control_error(value)
    return f"cannot be used: {error.partition(': ')[2]}" if error else None


def _masquerade(value: str) -> str | None:
    subnet, sep, bridge = value.partition(",")
    if not sep or not bridge:
        return "is not SUBNET,BRIDGE (e.g. 172.17.0.0/16,docker0)"
    try:
        ipaddress.ip_network(subnet, strict=False)
    except ValueError:
        return f"{shorten(subnet)} is not a subnet"
    if len(bridge) > 15 or "/" in bridge or bridge in (".", "..") or not bridge.isprintable() or " " in bridge:
        return f"{shorten(bridge)} is not an interface name"
    return None


def _group(value: str) -> str | None:
    import grp

    try:
        grp.getgrnam(value)
    except KeyError:
        return "is not a group on this system"
    return None


def _metrics_addr(value: str) -> str | None:
    if value == "off":
        return None
    from .metrics.server import parse_metrics_addr

    try:
        parse_metrics_addr(value)
    except ValueError:
        return "is not HOST:PORT (an IP address and a port) or off"
    return None


def _transparent_mark(value: str) -> str | None:
    from .kernel.transparent_rules import TransparentOptions

    try:
        mark, mask = parse_mark(value)
    except ValueError as exc:
        return str(exc)
    return TransparentOptions(mark=mark, mask=mask).check()


def parse_mark(value: str) -> tuple[int, int]:
    """``MARK[/MASK]`` → (mark, mask); no mask means all 32 bits."""
    mark, sep, mask = value.partition("/")
    try:
        return int(mark, 0), int(mask, 0) if sep else 0xFFFFFFFF
    except ValueError:
        raise ValueError("is not MARK[/MASK] (e.g. 0x1d000000/0xff000000)") from None


def _route_table(value: int) -> str | None:
    return "is a reserved routing table (253-255)" if value in (253, 254, 255) else None


GLOBAL, MAPPING, DAEMON = "global", "mapping", "daemon"
BOTH = frozenset({GLOBAL, MAPPING})

OPTIONS: tuple[Option, ...] = (
    Option("mode", str, MODES[0], "path: " + ", ".join(MODE_HELP[m] for m in MODES[:-1])
           + f", or {MODE_HELP[MODES[-1]]}", frozenset({MAPPING}), choices=MODES),
    Option("connect_timeout", float, 5.0, "time for the target to accept a TCP connection", BOTH, above=0,
           maximum=3600, metavar="SECONDS"),
    Option("udp_timeout", float, 90.0, "idle time before a UDP flow is forgotten (docker-proxy's value)", BOTH,
           minimum=1, maximum=86400, metavar="SECONDS"),
    Option("max_udp_flows", int, 4096, "UDP flows per port; past it the least recently active is evicted", BOTH,
           minimum=1, maximum=1 << 20, metavar="N"),
    Option("auto_bytes_per_second", float, 20e6, "auto mode: bytes/s through a mapping (both ways) that move it "
           "to the kernel path", minimum=1, metavar="BYTES"),
    Option("auto_connections_per_second", float, 200.0, "auto mode: new connections (or UDP flows) per second "
           "that move a mapping to the kernel path", minimum=0.1, metavar="N"),
    Option("auto_cool_seconds", float, 60.0, "auto mode: time under half of both thresholds before a mapping "
           "moves back to the userland path", minimum=1, maximum=86400, metavar="S"),
    Option("drain_timeout", float, 10.0, "on stop, time live connections get to finish", minimum=0, maximum=86400,
           metavar="SECONDS"),
    Option("splice", bool, True, "relay TCP with splice through pooled pipes (false: recv/send copies)"),
    Option("pipe_size", int, 1 << 20, "splice pipe size; falls back to 64 KiB where the limit forbids it",
           minimum=4096, maximum=1 << 30, metavar="BYTES"),
    Option("target_cc", str, None, "TCP congestion control toward the targets (default: the system's)", BOTH,
           check=_congestion_control, metavar="ALGORITHM", env="PORTPROXY_TARGET_CC"),
    Option("proxy_protocol", str, None, "send a PROXY protocol header (v1 or v2) with the client's address "
           "before any payload (TCP, userland path)", BOTH, choices=("v1", "v2"), metavar="v1|v2",
           env="PORTPROXY_PROXY_PROTOCOL"),
    Option("source", str, "host", "connect to the target from the host's address, or from the client's "
           "(transparent mode: installs an ip rule, a local route table and an nft marking rule)", BOTH,
           choices=("host", "client"), metavar="host|client", env="PORTPROXY_SOURCE"),
    Option("transparent_mark", str, "0x1d000000/0xff000000", "packet mark of transparent mode's replies",
           check=_transparent_mark, metavar="MARK[/MASK]"),
    Option("transparent_table", int, 7719, "routing table of transparent mode's local routes (must be unused)",
           minimum=1, maximum=0x7FFFFFFF, check=_route_table, metavar="N"),
    Option("route_localnet", bool, False, "kernel path: also publish on 127.0.0.0/8 "
           "(needs net.ipv4.conf.all.route_localnet=1)"),
    Option("masquerade", str, (), "kernel path: masquerade SUBNET's traffic that does not leave through BRIDGE",
           check=_masquerade, repeated=True, metavar="SUBNET,BRIDGE"),
    Option("set_sysctls", bool, False, "set the sysctls the kernel path needs instead of refusing"),
    Option("keep_kernel_rules", bool, False, "leave the nft table in place on stop (restart without a gap)",
           frozenset({DAEMON})),
    Option("socket_group", str, None, "members of this group may use the control socket", frozenset({DAEMON}),
           check=_group),
    Option("metrics_addr", str, None, "Prometheus metrics address HOST:PORT, or off", frozenset({DAEMON}),
           check=_metrics_addr),
)

BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}


def names(scope: str) -> list[str]:
    return [o.name for o in OPTIONS if scope in o.scopes or (scope == DAEMON and GLOBAL in o.scopes)]


# --- checking ----------------------------------------------------------------------------

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _from_text(option: Option, text: str) -> Any:
    """A flag's or an environment variable's text → the option's type."""
    if option.kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError("must be true or false")
    if option.kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError("is not a whole number") from None
    if option.kind is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError("is not a number") from None
    return text


def _check_one(option: Option, value: Any) -> Any:
    kind = option.kind
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        article = "an" if kind.__name__[0] in "aeiou" else "a"
        expected = {bool: "true or false", str: "a string", int: "a whole number", float: "a number"}.get(
            kind, f"{article} {kind.__name__}")
        raise ValueError(f"must be {expected}")
    if kind is float and not math.isfinite(value):
        raise ValueError("must be a finite number")
    if kind is str and (not value or "\x00" in value or len(value) > 4096):
        raise ValueError("must be a non-empty string")
    if option.choices is not None and value not in option.choices:
        raise ValueError(f"must be one of {', '.join(option.choices)}")
    if option.above is not None and not value > option.above:
        raise ValueError(f"must be greater than {option.above:g}")
    if option.minimum is not None and value < option.minimum:
        raise ValueError(f"must be at least {option.minimum:g}")
    if option.maximum is not None and value > option.maximum:
        raise ValueError(f"must be at most {option.maximum:g}")
    if option.check is not None:
        reason = option.check(value)
        if reason:
            raise ValueError(reason)
    return value


def check(name: str, value: Any, where: str = "", text: bool = False, label: str | None = None) -> Any:
    """The checked, typed value of option ``name``; BadInput with one line otherwise.

    ``text``: ``value`` is a flag's or variable's text (else a TOML/JSON value);
    ``label``: what the message calls it (a flag, a variable; default the key)."""
    option = BY_NAME[name]
    prefix = f"{where}: " if where else ""
    try:
        if option.repeated:
            items = [value] if text else value
            if not isinstance(items, (list, tuple)):
                raise ValueError("must be a list")
            return tuple(_check_one(option, _from_text(option, v) if text else v) for v in items)
        return _check_one(option, _from_text(option, value) if text else value)
    except ValueError as exc:
        shown = name if label is None else label
        raise BadInput(f"{prefix}{shown + ' ' if shown else ''}{shorten(value)} {exc}") from None


def check_table(raw: Any, scope: str, where: str, ignore: Iterable[str] = ()) -> dict[str, Any]:
    """Check a whole table (TOML ``[options]``, a ``[[mapping]]``, an API body).

    Unknown keys are refused, all of them named in one line; ``ignore`` lists keys the
    caller handles itself (``spec``)."""
    if not isinstance(raw, dict):
        raise BadInput(f"{where}: must be a table of options")
    allowed = set(names(scope)) | set(ignore)
    unknown = sorted(str(k) for k in raw if k not in allowed)
    if unknown:
        suggestions = [f"{k!r} (did you mean {close!r}?)" if (close := _closest(k, allowed)) else repr(k)
                       for k in unknown]
        raise BadInput(f"{where}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(suggestions)}")
    return {k: check(k, v, where) for k, v in raw.items() if k not in set(ignore)}


def _closest(key: str, allowed: set[str]) -> str | None:
    import difflib

    found = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
    return found[0] if found else None


def from_environment(environ: MappingType[str, str]) -> dict[str, Any]:
    """The options set through ``PORTPROXY_*`` variables (the drop-in's only channel)."""
    return {o.name: check(o.name, environ[o.env], text=True, label=o.env)
            for o in OPTIONS if o.env and environ.get(o.env)}


# --- argparse --------------------------------------------------------------------------

def argparse_type(name: str) -> Callable[[str], Any]:
    """The ``type=`` for a flag: the same check as everywhere, argparse's error on failure."""
    import argparse

    def convert(text: str) -> Any:
        try:
            value = check(name, text, text=True, label="")  # argparse names the flag itself
        except BadInput as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value[0] if BY_NAME[name].repeated else value

    convert.__name__ = name
    return convert


def add_arguments(group: Any, wanted: Iterable[str]) -> None:
    """Add the flags of ``wanted`` options to an argparse group, defaults left unset (None)
    so that :func:`given` can tell what the user said."""
    for name in wanted:
        option = BY_NAME[name]
        help_text = option.help + (f" (default {option.default:g})" if isinstance(option.default, (int, float))
                                   and not isinstance(option.default, bool) else "")
        if option.kind is bool:
            import argparse

            group.add_argument(option.flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        elif option.repeated:
            group.add_argument(option.flag, dest=name, type=argparse_type(name), action="append", default=None,
                               metavar=option.metavar, help=help_text + " (repeatable)")
        else:
            group.add_argument(option.flag, dest=name, type=argparse_type(name), default=None,
                               metavar=option.metavar, choices=option.choices, help=help_text)


def given(namespace: Any, wanted: Iterable[str]) -> dict[str, Any]:
    """The options a parsed command line set (flags left out are absent)."""
    values = {}
    for name in wanted:
        value = getattr(namespace, name, None)
        if value is not None:
            values[name] = tuple(value) if BY_NAME[name].repeated else value
    return values


# --- into the option objects ------------------------------------------------------------

PROXY_FIELDS = ("connect_timeout", "udp_timeout", "max_udp_flows", "drain_timeout", "splice", "pipe_size",
                "target_cc", "proxy_protocol", "source")


def proxy_options(values: dict[str, Any], base: Any = None) -> Any:
    """ProxyOptions from checked values (on top of ``base``)."""
    from .proxy.options import ProxyOptions

    fields = {k: v for k, v in values.items() if k in PROXY_FIELDS}
    return dataclasses.replace(base or ProxyOptions(), **fields)


def kernel_options(values: dict[str, Any]) -> Any:
    from .kernel.builders import KernelOptions

    masquerade = tuple(tuple(item.partition(",")[::2]) for item in values.get("masquerade", ()))
    return KernelOptions(route_localnet=values.get("route_localnet", False), masquerade=masquerade)


def auto_thresholds(values: dict[str, Any]) -> Any:
    """When an auto mapping moves (:class:`~portproxy.controller.auto.AutoThresholds`)."""
    from .controller.auto import AutoThresholds

    return AutoThresholds(
        bytes_per_second=values.get("auto_bytes_per_second", BY_NAME["auto_bytes_per_second"].default),
        connections_per_second=values.get("auto_connections_per_second",
                                          BY_NAME["auto_connections_per_second"].default),
        cool_after=values.get("auto_cool_seconds", BY_NAME["auto_cool_seconds"].default))


def transparent_options(values: dict[str, Any]) -> Any:
    """TransparentOptions (mark, mask, table) from checked values."""
    from .kernel.transparent_rules import TransparentOptions

    mark, mask = parse_mark(values.get("transparent_mark", BY_NAME["transparent_mark"].default))
    return TransparentOptions(mark=mark, mask=mask, table=values.get("transparent_table", 7719))
