"""The CNI contract, pure: environment and stdin in, result or error JSON out. No I/O.

Facts followed here (CNI spec 1.1 and CONVENTIONS.md, and containernetworking/plugins'
``portmap``, the plugin this one replaces):

- the command and its arguments come in ``CNI_*`` variables; the network configuration
  (with ``prevResult`` and ``runtimeConfig.portMappings``) as JSON on stdin;
- ``portMappings`` entries are ``{"hostPort", "containerPort", "protocol", "hostIP"?}``;
  a ``hostIP`` of the other family than a container address is skipped for it, an
  unspecified one (``0.0.0.0``, ``::``) means every address;
- the container's addresses are the first IPv4 and first IPv6 of ``prevResult.ips``
  that belong to the sandbox interface ``CNI_IFNAME`` (portmap's rule);
- ADD passes ``prevResult`` through, in the configuration's ``cniVersion``; ADD without
  ``prevResult`` is refused ("must be called as chained plugin");
- errors are ``{"cniVersion", "code", "msg", "details"}`` on stdout with a non-zero exit;
- every key read from stdin (netconf, ``runtimeConfig``, its ``portMappings``, ``prevResult``)
  is matched as Go's ``encoding/json`` matches a struct field (:func:`go_key`): portmap
  reads them so, and runtimes rely on it (containerd's go-cni sends ``HostPort``,
  ``ContainerPort``, ``Protocol``, ``HostIP``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
from typing import Any, Mapping as EnvMapping

from ..spec import IPAddress, Mapping, ipv4_mapped_problem
from .conditions import Condition, ConditionError, parse_conditions

from .versions import SUPPORTED_VERSIONS

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS")

# Error codes of the spec (0-99 are reserved for it) and this plugin's own (100+).
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN = 11
ERR_NOT_AVAILABLE = 50
ERR_CHECK_FAILED = 100
"""CHECK found a mapping missing or altered."""
ERR_PORT_TAKEN = 101
"""ADD: a host port is already published by another attachment."""
ERR_INTERNAL = 999
"""Anything unexpected (libcni's ErrInternal)."""

COMMENT_MAX = 127
"""Longest nft element comment in bytes (NFTNL_UDATA_COMMENT_MAXLEN 128, with its NUL)."""

OWNER_FIELD_MAX = 256
"""Longest owner field ``portproxy serve`` takes (``validate_owner`` in controller/core.py)."""

SUN_PATH_MAX = 107
"""Longest unix socket path in bytes (``sun_path`` is 108, with its NUL)."""


class CniError(Exception):
    """A failure reported to the runtime as CNI error JSON."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


# --- keys as Go matches them -----------------------------------------------------------

_GO_FOLD = {**{ord(c): c.upper() for c in "abcdefghijklmnopqrstuvwxyz"}, 0x17F: "S", 0x212A: "K"}
"""Go's simple case folding, as far as it reaches ASCII names: ASCII letters, and the two
other runes whose fold class holds one (long s U+017F with S, the Kelvin sign U+212A
with K; no third single rune case-folds to ASCII). Other characters are left as
they are, so they never fold equal to an ASCII name, as in Go. ``str.upper`` would be
wrong here: it does full case mapping (U+00DF sharp s becomes "SS"), Go does not."""


def go_key(obj: dict, name: str) -> str | None:
    """The key of ``obj`` whose value Go's ``encoding/json`` decodes into the struct field
    tagged ``name`` (an ASCII name), or None.

    Go matches every key of an object to a field, the exact name first, else
    case-insensitively by simple Unicode folding, and assigns the fields in document
    order: when several keys match one field (``hostPort`` and ``HostPort``), the **last**
    one wins, exact or not (golang/go#43664, #28190). "Preferring an exact match" in
    Go's documentation chooses between two *fields* for one key, which the structs read
    here never need. :func:`decode` keeps a repeated key at its last place, so "last" in
    ``obj`` is last in the document. (Two spellings of an *object* are merged field by
    field by Go; here the last whole value counts.) This is how portmap, libcni's types
    and every Go plugin read the netconf, ``runtimeConfig`` and ``prevResult``."""
    folded, size, found = name.translate(_GO_FOLD), len(name), None
    for key in obj:
        if key == name or (len(key) == size and key.translate(_GO_FOLD) == folded):
            found = key
    return found


def _go_matches(key: str, name: str) -> bool:
    """Whether Go would decode ``key`` into the field tagged ``name`` (exact, or equal when folded)."""
    return key == name or (len(key) == len(name) and key.translate(_GO_FOLD) == name.translate(_GO_FOLD))


def go_get(obj: dict, name: str, default: Any = None) -> Any:
    """``obj``'s value for the Go struct field tagged ``name`` (see :func:`go_key`), or ``default``."""
    key = go_key(obj, name)
    return default if key is None else obj[key]


# --- environment ---------------------------------------------------------------------

_REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "GC": (),
    "STATUS": (),
    "VERSION": (),
}


@dataclasses.dataclass(frozen=True)
class Env:
    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: dict[str, str] = dataclasses.field(default_factory=dict)
    portproxy_socket: str = ""
    """``$PORTPROXY_SOCKET``, if the runtime passed it on."""


def parse_env(environ: EnvMapping[str, str]) -> Env:
    """The ``CNI_*`` variables, checked for what ``CNI_COMMAND`` needs.

    ``CNI_CONTAINERID`` and ``CNI_IFNAME`` are validated where they are required (ADD,
    CHECK, DEL), as the Go ``skel`` does: they go into the space-separated owner token,
    so an ID with a space would make mappings that no DEL could find again."""
    command = environ.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(ERR_INVALID_ENV, f"unknown CNI_COMMAND {command!r}", f"expected one of {', '.join(COMMANDS)}")
    missing = [name for name in _REQUIRED_ENV[command] if not environ.get(name)]
    if missing:
        raise CniError(ERR_INVALID_ENV, f"{command} needs {', '.join(missing)}")
    if "CNI_CONTAINERID" in _REQUIRED_ENV[command]:
        if not _NAME.fullmatch(environ["CNI_CONTAINERID"]):
            raise CniError(ERR_INVALID_ENV, f"invalid characters in CNI_CONTAINERID {environ['CNI_CONTAINERID']!r}",
                           _NAME_RULE)
        check_ifname(environ["CNI_IFNAME"])
    return Env(command, environ.get("CNI_CONTAINERID", ""), environ.get("CNI_NETNS", ""),
               environ.get("CNI_IFNAME", ""), parse_cni_args(environ.get("CNI_ARGS", "")),
               environ.get("PORTPROXY_SOCKET", ""))


_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*")
"""A container ID or network name (libcni's ``cniValidNameChars``)."""
_NAME_RULE = "a letter or digit, then letters, digits, '_', '.' or '-'"

_GO_SPACE = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
                      "\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
"""What Go's ``unicode.IsSpace`` calls whitespace (Python's ``isspace`` differs a little)."""

IFNAME_MAX = 15
"""Longest interface name in bytes (IFNAMSIZ 16, with its NUL)."""


def check_ifname(ifname: str) -> None:
    """``CNI_IFNAME`` by libcni's ``ValidateInterfaceName`` (the kernel's ``dev_valid_name``),
    and UTF-8, since it is recorded as text in the owner token."""
    try:
        size = len(ifname.encode())
    except UnicodeEncodeError:  # undecodable bytes in the environment (surrogateescape)
        raise CniError(ERR_INVALID_ENV, "CNI_IFNAME is not UTF-8") from None
    why = ("is empty" if not ifname else f"is too long ({size} bytes, at most {IFNAME_MAX})" if size > IFNAME_MAX
           else "is . or .." if ifname in (".", "..")
           else "contains / or : or whitespace" if any(c in "/:" or c in _GO_SPACE for c in ifname) else "")
    if why:
        raise CniError(ERR_INVALID_ENV, f"CNI_IFNAME {ifname!r} {why}")


def parse_cni_args(text: str) -> dict[str, str]:
    """``IgnoreUnknown=1;K8S_POD_NAME=web`` → a dict (pairs without ``=`` are ignored)."""
    args: dict[str, str] = {}
    for pair in text.split(";"):
        key, eq, value = pair.partition("=")
        if eq and key:
            args[key] = value
    return args


# --- configuration -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PortMapping:
    host_port: int
    container_port: int
    protocol: str
    host_ip: IPAddress | None


@dataclasses.dataclass(frozen=True)
class Config:
    cni_version: str
    name: str
    prev_result: dict | None
    port_mappings: tuple[PortMapping, ...]
    snat: bool = True
    masq_all: bool = False
    conditions: tuple[Condition, ...] = ()
    valid_attachments: tuple[tuple[str, str], ...] = ()
    """GC: the (containerID, ifname) pairs to keep."""
    daemon_socket: str | None = None
    """``daemonSocket``: the ``portproxy serve`` control socket; ``""`` turns daemon mode off."""


def _obj(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise CniError(ERR_INVALID_CONFIG, f"{what} must be a JSON object")
    return value


def _bool(conf: dict, key: str, default: bool) -> bool:
    value = go_get(conf, key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise CniError(ERR_INVALID_CONFIG, f"{key} must be true or false")
    return value


MAX_DEPTH = 512
"""Deepest nesting of objects and arrays accepted on stdin. A configuration with its
prevResult is a few levels deep; the limit keeps everything that walks the document
afterwards (the answer's encoding, the request to the daemon) far from Python's
recursion limit, which ``json.loads`` itself hits near 1,000 levels."""


def _depth(value: Any) -> int:
    """How deeply ``value`` nests objects and arrays, without recursing (stops past MAX_DEPTH)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, (dict, list)):
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            break
        stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _last_place(pairs: list[tuple[str, Any]]) -> dict:
    """An object whose repeated key keeps its last value *at its last place*: Python keeps
    the first place, but :func:`go_key` needs the document's order of assignment."""
    obj = dict(pairs)
    if len(obj) < len(pairs):  # a key repeated: rare, so the common case stays in C
        obj = {}
        for key, value in pairs:
            obj.pop(key, None)
            obj[key] = value
    return obj


def decode(stdin: bytes) -> dict:
    """stdin as a JSON object, or a decoding error (CNI code 6)."""
    failed = "failed to parse network configuration"
    try:
        conf = json.loads(stdin, object_pairs_hook=_last_place)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CniError(ERR_DECODE, failed, str(exc)) from None
    except RecursionError:
        raise CniError(ERR_DECODE, failed, f"stdin nests objects or arrays deeper than {MAX_DEPTH} levels") from None
    if not isinstance(conf, dict):
        raise CniError(ERR_DECODE, failed, "stdin is not a JSON object")
    if _depth(conf) > MAX_DEPTH:
        raise CniError(ERR_DECODE, failed, f"stdin nests objects or arrays deeper than {MAX_DEPTH} levels")
    return conf


def check_version(conf: dict) -> str:
    version = go_get(conf, "cniVersion")
    if not isinstance(version, str) or not version:
        raise CniError(ERR_INVALID_CONFIG, "cniVersion is missing")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(ERR_INCOMPATIBLE_VERSION, f"incompatible CNI version {version}",
                       f"supported: {', '.join(SUPPORTED_VERSIONS)}")
    return version


def parse_config(conf: dict) -> Config:
    """The network configuration this plugin reads (unknown keys are ignored, as the spec says)."""
    version = check_version(conf)
    name = go_get(conf, "name")
    if not name:
        raise CniError(ERR_INVALID_CONFIG, "missing network name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise CniError(ERR_INVALID_CONFIG, f"invalid characters found in network name {name!r}", _NAME_RULE)
    if len(name) > OWNER_FIELD_MAX:  # not libcni's rule: portproxy serve would refuse it as an owner
        raise CniError(ERR_INVALID_CONFIG, f"network name is too long ({len(name)} characters, "
                       f"at most {OWNER_FIELD_MAX})")
    prev = go_get(conf, "prevResult")
    if prev is not None:
        _obj(prev, "prevResult")
    runtime = _obj(go_get(conf, "runtimeConfig") or {}, "runtimeConfig")
    entries = go_get(runtime, "portMappings") or []
    if not isinstance(entries, list):
        raise CniError(ERR_INVALID_CONFIG, "runtimeConfig.portMappings must be a list")
    try:
        conditions = (parse_conditions(go_get(conf, "conditionsV4"), 4)
                      + parse_conditions(go_get(conf, "conditionsV6"), 6))
    except ConditionError as exc:
        raise CniError(ERR_INVALID_CONFIG, str(exc)) from None
    for key in ("externalSetMarkChain",):
        if go_get(conf, key) is not None:
            raise CniError(ERR_UNSUPPORTED_FIELD, f"{key} is iptables-only; portproxy-cni does not support it")
    if (backend := go_get(conf, "backend")) not in (None, "nftables"):
        raise CniError(ERR_UNSUPPORTED_FIELD, f"backend {backend!r}: portproxy-cni always uses nftables")
    daemon_socket = _daemon_socket(go_get(conf, "daemonSocket"))
    return Config(
        cni_version=version, name=name, prev_result=prev,
        port_mappings=tuple(_port_mapping(e, i) for i, e in enumerate(entries)),
        snat=_bool(conf, "snat", True), masq_all=_bool(conf, "masqAll", False), conditions=conditions,
        valid_attachments=_attachments(go_get(conf, "cni.dev/valid-attachments")), daemon_socket=daemon_socket,
    )


def _daemon_socket(value: Any) -> str | None:
    """``daemonSocket``: None (not given), ``""`` (daemon mode off) or a path a unix socket can have."""
    if value is None or value == "":
        return value
    if not isinstance(value, str):
        raise CniError(ERR_INVALID_CONFIG, "daemonSocket must be a path (a string)")
    why = ("is not an absolute path" if not value.startswith("/") else "contains a NUL byte" if "\0" in value
           else f"is longer than a unix socket path can be ({SUN_PATH_MAX} bytes)"
           if len(value.encode(errors="surrogatepass")) > SUN_PATH_MAX else "")
    if why:
        raise CniError(ERR_INVALID_CONFIG, f"daemonSocket {value[:SUN_PATH_MAX + 1]!r} {why}",
                       "give the path of portproxy serve's control socket, or \"\" for no daemon")
    return value


def _port(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise CniError(ERR_INVALID_CONFIG, f"{what} must be a port number 1-65535, not {value!r}")
    return value


def _port_mapping(entry: Any, index: int) -> PortMapping:
    where = f"runtimeConfig.portMappings[{index}]"
    entry = _obj(entry, where)
    proto = go_get(entry, "protocol") or "tcp"
    if not isinstance(proto, str) or proto.lower() not in ("tcp", "udp"):
        raise CniError(ERR_INVALID_CONFIG, f"{where}.protocol {proto!r} is not supported (tcp or udp)")
    host_ip: IPAddress | None = None
    if value := go_get(entry, "hostIP"):
        host_ip = _host_ip(value, f"{where}.hostIP")
    return PortMapping(_port(go_get(entry, "hostPort"), f"{where}.hostPort"),
                       _port(go_get(entry, "containerPort"), f"{where}.containerPort"), proto.lower(), host_ip)


def _host_ip(value: Any, what: str) -> IPAddress:
    """A ``hostIP``: a plain address, as ``portproxy serve`` takes it in a spec."""
    try:
        if not isinstance(value, str):  # ip_address() takes integers too
            raise ValueError
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise CniError(ERR_INVALID_CONFIG, f"{what} {value!r} is not an IP address") from None
    if getattr(ip, "scope_id", None):
        raise CniError(ERR_INVALID_CONFIG, f"{what} {value!r} has a zone (%{ip.scope_id}); nftables matches "
                       "addresses without one: give the address alone")
    if why := ipv4_mapped_problem(ip):
        raise CniError(ERR_INVALID_CONFIG, f"{what} {value!r} {why}")
    if ip.is_multicast:  # as spec.py refuses it for the daemon
        raise CniError(ERR_INVALID_CONFIG, f"{what} {value!r} is a multicast address")
    return ip


def _attachments(value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise CniError(ERR_INVALID_CONFIG, "cni.dev/valid-attachments must be a list")
    out = []
    for item in value:
        cid, ifname = (go_get(item, "containerID"), go_get(item, "ifname")) if isinstance(item, dict) else (None, None)
        if not isinstance(cid, str) or not isinstance(ifname, str):
            raise CniError(ERR_INVALID_CONFIG, "cni.dev/valid-attachments entries need containerID and ifname strings")
        out.append((cid, ifname))
    return tuple(out)


# --- prevResult ------------------------------------------------------------------------

def container_addresses(prev: dict, ifname: str) -> list[IPAddress]:
    """The container's first IPv4 and first IPv6 address on ``ifname`` (portmap's choice)."""
    ips = go_get(prev, "ips") or []
    interfaces = go_get(prev, "interfaces") or []
    if not isinstance(ips, list) or not isinstance(interfaces, list):
        raise CniError(ERR_INVALID_CONFIG, "prevResult: ips and interfaces must be lists")
    found: dict[int, IPAddress] = {}
    for ip in ips:
        text = go_get(ip, "address") if isinstance(ip, dict) else None
        if not isinstance(text, str):
            raise CniError(ERR_INVALID_CONFIG, "prevResult: an ips entry has no address")
        try:
            address = ipaddress.ip_interface(text).ip
        except ValueError:
            raise CniError(ERR_INVALID_CONFIG, f"prevResult: {text!r} is not an address/prefix") from None
        if address.version in found:
            continue
        index = go_get(ip, "interface")
        if isinstance(index, int) and 0 <= index < len(interfaces):
            iface = interfaces[index] if isinstance(interfaces[index], dict) else {}
            if go_get(iface, "name") != ifname or not go_get(iface, "sandbox"):
                continue  # a host-side interface, not the container's
        found[address.version] = address
    return [found[v] for v in sorted(found)]


def _refuse_unpublished(port_mappings: tuple[PortMapping, ...], out: list[Mapping], families: set[int]) -> None:
    published = {(host_port, m.proto) for m in out for host_port, _ in m.port_pairs()}
    for pm in port_mappings:
        if (pm.host_port, pm.protocol) not in published and pm.host_ip is not None:
            host = f"[{pm.host_ip}]" if pm.host_ip.version == 6 else str(pm.host_ip)
            have = " and ".join(f"IPv{v}" for v in sorted(families))
            raise CniError(ERR_INVALID_CONFIG, f"cannot publish {host}:{pm.host_port}/{pm.protocol}: the "
                           f"container has no IPv{pm.host_ip.version} address (only {have})",
                           "give a hostIP of the container's family, or none")


def mappings_for(port_mappings: tuple[PortMapping, ...], addresses: list[IPAddress]) -> list[Mapping]:
    """portproxy mappings for every container address family each entry applies to.

    Consecutive ports (runtimes expand ``-p 8000-8010:8000-8010`` into one entry per port)
    are joined into one range mapping, so they share one mapping id and counter.

    A host port that would be published in no family is refused (code 7): a container
    without an address, or only entries whose hostIP is of a family the container has no
    address of (``::1`` for an IPv4-only container). The runtime would report a port
    published that nothing publishes. (portmap succeeds silently there.) An entry of the
    missing family beside one that is published (``0.0.0.0`` and ``::`` for the same
    port) is skipped, as portmap does. The same input always fails the same way, so it
    is the configuration that is wrong, not the moment: not code 11.
    """
    if port_mappings and not addresses:
        raise CniError(ERR_INVALID_CONFIG, "cannot publish ports: prevResult gives the container no IP address",
                       "the ports need an address on the container's interface (CNI_IFNAME) from the plugin before")
    out: list[Mapping] = []
    for address in addresses:
        for pm in port_mappings:
            host_ip = pm.host_ip
            if host_ip is not None:
                if host_ip.version != address.version:
                    continue  # portmap: a hostIP of the other family is skipped
                if host_ip.is_unspecified:
                    host_ip = None
            m = Mapping(pm.protocol, host_ip, pm.host_port, pm.host_port, address, pm.container_port,  # type: ignore[arg-type]
                        pm.container_port)
            last = out[-1] if out else None
            if (last is not None and (last.proto, last.host_ip, last.target_ip) == (m.proto, m.host_ip, m.target_ip)
                    and last.host_port_end + 1 == m.host_port and last.target_port_end + 1 == m.target_port):
                out[-1] = dataclasses.replace(last, host_port_end=m.host_port, target_port_end=m.target_port)
            else:
                out.append(m)
    out = list(dict.fromkeys(out))
    _refuse_unpublished(port_mappings, out, {address.version for address in addresses})
    seen: dict[tuple, Mapping] = {}
    for m in out:
        for host_port, _ in m.port_pairs():
            key = (m.family, m.host_ip, m.proto, host_port)
            if key in seen:
                raise CniError(ERR_INVALID_CONFIG, f"host port {host_port}/{m.proto} is mapped twice",
                               f"{seen[key]} and {m}")
            seen[key] = m
    return out


def result_for(prev: dict, version: str) -> dict:
    """prevResult passed through in ``version``'s format (0.4.0 has ``ips[].version``, 1.x not).

    The keys rewritten here (``cniVersion``, ``ips``, ``ips[].version``) are read as Go reads
    them and written in their own spelling, as portmap's re-encoded result has them; every
    other key passes through as it came."""
    ips_key = go_key(prev, "ips")
    result = {"cniVersion": version, **{key: value for key, value in prev.items()
                                        if not _go_matches(key, "cniVersion") and not _go_matches(key, "ips")}}
    if ips_key is not None:
        ips = []
        for ip in prev[ips_key] or []:
            ip = {key: value for key, value in ip.items() if not _go_matches(key, "version")}
            if version.startswith("0."):
                ip["version"] = str(ipaddress.ip_interface(go_get(ip, "address")).version)
            ips.append(ip)
        result["ips"] = ips
    return result


# --- ownership -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Owner:
    """One attachment (network, container, interface): what owns a set of mappings.

    The nft table remembers it as an element comment (see :meth:`token`); phase 2 (a
    running ``portproxy serve``) will pass :meth:`controller_owner` to the daemon.
    """

    network: str
    container_id: str
    ifname: str
    pod: str = ""
    namespace: str = ""

    def token(self) -> str:
        """``CONTAINERID IFNAME NETWORK``; a network name that would not fit is hashed.
        Measured in bytes, as nft limits a comment."""
        head = f"{self.container_id} {self.ifname}"
        if _size(head) + 1 + _size(self.network) <= COMMENT_MAX:
            return f"{head} {self.network}"
        tagged = f"{head} {network_hash(self.network)}"
        if _size(tagged) > COMMENT_MAX:
            raise CniError(ERR_INVALID_ENV, "CNI_CONTAINERID and CNI_IFNAME are too long to record",
                           f"at most {COMMENT_MAX - 18} bytes together")
        return tagged

    def label(self) -> str | None:
        """``NAMESPACE/POD`` (or ``POD``) for the table, so a daemon adopting the mappings can
        show who they are for; cut to what a comment holds, in bytes on a character boundary
        (it is only for display; libnftables aborts on a longer comment)."""
        name = "/".join(part for part in (self.namespace, self.pod) if part)
        return name.encode(errors="replace")[:COMMENT_MAX].decode(errors="ignore") or None

    @classmethod
    def from_controller(cls, owner: dict[str, Any]) -> "Owner":
        """The attachment an API owner object names (the inverse of :meth:`controller_owner`)."""
        return cls(*(str(owner.get(key, "")) for key in ("network", "id", "ifname", "name", "namespace")))

    def controller_owner(self) -> dict[str, str]:
        """The owner object of the controller API (phase 2)."""
        owner = {"kind": "cni", "id": self.container_id, "ifname": self.ifname, "network": self.network}
        if self.pod:  # display only: cut to what the daemon takes rather than be refused
            owner["name"] = self.pod[:OWNER_FIELD_MAX]
        if self.namespace:
            owner["namespace"] = self.namespace[:OWNER_FIELD_MAX]
        return owner


def _size(text: str) -> int:
    """Bytes of ``text`` in UTF-8 (undecodable environment bytes counted as 3, never an error)."""
    return len(text.encode(errors="surrogatepass"))


def network_hash(network: str) -> str:
    import hashlib  # rarely needed (long network names); 3 ms of every start otherwise

    return "#" + hashlib.sha256(network.encode()).hexdigest()[:16]


def owner_of(env: Env, conf: Config) -> Owner:
    return Owner(conf.name, env.container_id, env.ifname, env.args.get("K8S_POD_NAME", ""),
                 env.args.get("K8S_POD_NAMESPACE", ""))


def token_network(token: str) -> tuple[str, str, str]:
    """(container id, ifname, network or its hash) of a token."""
    parts = token.split(" ", 2)
    if len(parts) != 3:
        return "", "", ""
    return parts[0], parts[1], parts[2]


def gc_doomed(token: str, network: str, keep: set[tuple[str, str]]) -> bool:
    """GC: whether a token belongs to ``network`` and names an attachment not in ``keep``."""
    cid, ifname, net = token_network(token)
    if net not in (network, network_hash(network)):
        return False
    return (cid, ifname) not in keep


# --- output ------------------------------------------------------------------------------

def error_json(err: CniError, version: str) -> dict:
    return {"cniVersion": version, "code": err.code, "msg": err.msg, "details": err.details}
