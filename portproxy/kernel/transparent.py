"""Transparent mode's routing, installed while at least one transparent mapping exists.

What is installed and why: see :mod:`transparent_rules`. This module is the I/O edge:
pyroute2 for the ip rules and routes, libnftables for the marking table. Every
method blocks on netlink; call it from a worker thread (:mod:`portproxy.offloop`),
never from the data-plane loop.

Ownership: only the exact rule and route built from :class:`TransparentOptions` are
ever added or deleted, and the nft table ``portproxy_transparent`` (ours by name).
Before adding, the routing table is checked: any other rule pointing at it or any
other route in it means another program uses that table number, and the install is
refused (pick another ``table``). So is a foreign rule evaluated before ours that would
take the marked replies itself (see :func:`transparent_rules.shadowing_rule`): with it,
every connection would time out. An identical rule or route left by a crashed run is
taken over, so a restart works. :meth:`TransparentRouting.problem` finds such a rule
added later.

The target must route its replies back through this host (its default gateway is
the host, as for a container on a bridge of this host): a reply that takes another
way never reaches the proxy's socket.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
from typing import Any, Callable, Iterable

from ..errors import BadInput, Conflict, PortproxyError, SystemFailure, Unavailable
from .executor import CAP_NET_ADMIN, Nft, NftError, has_capability
from .transparent_rules import (FAMILIES, TransparentOptions, delete_commands, install_commands, route_args,
                                route_is_ours, rule_args, rule_is_ours, shadowing_rule)

log = logging.getLogger("portproxy.transparent")


class TransparentError(SystemFailure):
    """The routing cannot be installed or removed; the message is one readable line."""


class TransparentUnavailable(TransparentError, Unavailable):
    """No CAP_NET_ADMIN, no policy routing, no nft ``socket`` expression."""


class TransparentConflict(TransparentError, Conflict):
    """The routing table number is used by another program, or another program's ip rule
    would take the marked replies before ours."""


def _family_name(family: int) -> str:
    return "IPv6" if family == socket.AF_INET6 else "IPv4"


def _rule_dict(msg: Any) -> dict[str, Any]:
    return {"table": msg.get_attr("FRA_TABLE") or msg["table"], "priority": msg.get_attr("FRA_PRIORITY") or 0,
            "fwmark": msg.get_attr("FRA_FWMARK"), "fwmask": msg.get_attr("FRA_FWMASK"),
            "src": msg.get_attr("FRA_SRC"), "src_len": msg["src_len"], "dst": msg.get_attr("FRA_DST"),
            "dst_len": msg["dst_len"], "iifname": msg.get_attr("FRA_IIFNAME"), "oifname": msg.get_attr("FRA_OIFNAME"),
            "action": msg["action"], "flags": msg["flags"], "goto": msg.get_attr("FRA_GOTO"), "tos": msg["tos"],
            "ip_proto": msg.get_attr("FRA_IP_PROTO"), "sport_range": msg.get_attr("FRA_SPORT_RANGE"),
            "dport_range": msg.get_attr("FRA_DPORT_RANGE"), "uid_range": msg.get_attr("FRA_UID_RANGE"),
            "l3mdev": msg.get_attr("FRA_L3MDEV")}


def _shadow(ipr: Any, family: int, rules: list[dict[str, Any]], opts: TransparentOptions) -> str | None:
    """:func:`shadowing_rule` for one family, with the routes of the tables it looks at read here."""
    candidates = {rule["table"] for rule in rules if rule["priority"] <= opts.priority and rule["table"]}
    with_routes = {table for table in candidates if ipr.get_routes(family=family, table=table)}
    return shadowing_rule(rules, opts, with_routes, _family_name(family))


def _route_dict(msg: Any) -> dict[str, Any]:
    return {"type": msg["type"], "dst_len": msg["dst_len"], "oif": msg.get_attr("RTA_OIF"),
            "table": msg.get_attr("RTA_TABLE") or msg["table"]}


def _scan(items: Iterable[dict[str, Any]], table: int, ours: Callable[[dict[str, Any]], bool],
          conflict: str) -> tuple[bool, str | None]:
    """(one of ``items`` pointing at ``table`` is ours, ``conflict`` if another one does)."""
    found = False
    for item in items:
        if item["table"] != table:
            continue
        if not ours(item):
            return False, conflict
        found = True
    return found, None


class TransparentRouting:
    """The fwmark rule, the local routes and the marking table of one network namespace."""

    def __init__(self, opts: TransparentOptions | None = None) -> None:
        self.opts = opts or TransparentOptions()
        self.installed = False
        self._families: list[int] = []
        """Families whose rule and route are ours to remove."""

    # --- reading -------------------------------------------------------------------
    def _state(self, ipr: Any, family: int, lo: int) -> tuple[bool, bool, str | None, str | None]:
        """(our rule present, our route present, a conflict or None, a shadowing rule or None)
        for one family. A conflict is another program's use of our table; a shadowing rule
        one that takes the marked replies before ours (see :func:`shadowing_rule`)."""
        opts = self.opts
        name = _family_name(family)
        rules = [_rule_dict(m) for m in ipr.get_rules(family=family)]
        rule_found, conflict = _scan(rules, opts.table, lambda rule: rule_is_ours(rule, opts),
                                     f"is already used by another {name} ip rule")
        if conflict is None:
            route_found, conflict = _scan((_route_dict(m) for m in ipr.get_routes(family=family, table=opts.table)),
                                          opts.table, lambda route: route_is_ours(route, lo),
                                          f"already holds {name} routes of another program")
        if conflict is not None:
            why = f"routing table {opts.table} {conflict}; choose another table for transparent mode"
            return False, False, why, None
        return rule_found, route_found, None, _shadow(ipr, family, rules, opts)

    def present(self) -> bool:
        """Are the rules, routes and nft table all there (for reconciling)?

        A foreign rule that takes the replies first is not an absence (installing again
        cannot help): :meth:`problem` reports it."""
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            for family in self._families:
                rule, route, conflict, _shadowed = self._state(ipr, family, lo)
                if conflict or not (rule and route):
                    return False
        try:
            return Nft().table_exists("inet", self.opts.nft_table)
        except NftError:
            return False

    def problem(self) -> str | None:
        """What keeps the installed routing from working that installing again cannot fix,
        in one line (another program's rule taking the replies first, or using our table),
        or None. For the reconcile loop, beside :meth:`present`."""
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            for family in self._families:
                _rule, _route, conflict, shadowed = self._state(ipr, family, lo)
                if conflict or shadowed:
                    return conflict or shadowed
        return None

    # --- changes -------------------------------------------------------------------
    def install(self) -> None:
        """Install (or complete, after someone deleted a piece) everything; idempotent.

        On failure nothing of what this call added is left, and TransparentError says why."""
        problem = self.opts.check()
        if problem:
            raise BadInput(problem)
        if not has_capability(CAP_NET_ADMIN):
            raise TransparentUnavailable("transparent mode needs CAP_NET_ADMIN (ip rules, routes, nftables and "
                                   "IP_TRANSPARENT sockets); run as root or grant it")
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        added: list[tuple[str, int, dict[str, Any]]] = []
        families: list[int] = []
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            try:
                for family in FAMILIES:
                    try:
                        rule, route, conflict, shadowed = self._state(ipr, family, lo)
                    except NetlinkError as exc:
                        if family == socket.AF_INET6 and exc.code == errno.EAFNOSUPPORT:
                            continue  # IPv6 disabled on this host: nothing to route
                        raise
                    if conflict or shadowed:
                        raise TransparentConflict(conflict or shadowed)
                    if not rule:
                        args = rule_args(self.opts, family)
                        ipr.rule("add", **args)
                        added.append(("rule", family, args))
                    if not route:
                        args = route_args(self.opts, family, lo)
                        ipr.route("add", **args)
                        added.append(("route", family, args))
                    families.append(family)
                self._apply_nft()
            except (NetlinkError, PortproxyError) as exc:
                for kind, _family, args in reversed(added):
                    try:
                        getattr(ipr, kind)("del", **args)
                    except NetlinkError:
                        pass
                if isinstance(exc, PortproxyError):
                    raise
                what = "policy routing (ip rule / local routes)"
                if exc.code in (errno.EAFNOSUPPORT, errno.EOPNOTSUPP, errno.EPERM):
                    raise TransparentUnavailable(f"transparent mode needs {what}: {exc.args[-1]}") from None
                raise TransparentError(f"transparent mode cannot install its {what}: {exc.args[-1]}") from None
        self._families = families
        self.installed = True
        if added:
            log.info("transparent mode: fwmark %#x/%#x -> table %d installed", self.opts.mark, self.opts.mask,
                     self.opts.table)

    def _apply_nft(self) -> None:
        try:
            Nft().apply(install_commands(self.opts))
        except NftError as exc:
            raise TransparentUnavailable(f"transparent mode cannot install its marking rule "
                                   f"(nft 'socket transparent', needs the nft_socket module): {exc}") from None

    def remove(self) -> None:
        """Delete exactly what install added (the rule, the route, the nft table). Idempotent."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        errors: list[str] = []
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            for family in self._families:
                for kind, args in (("rule", rule_args(self.opts, family)), ("route", route_args(self.opts, family, lo))):
                    try:
                        getattr(ipr, kind)("del", **args)
                    except NetlinkError as exc:
                        if exc.code not in (errno.ENOENT, errno.ESRCH):
                            errors.append(f"{kind}: {exc.args[-1]}")
        try:
            nft = Nft()
            if nft.table_exists("inet", self.opts.nft_table):
                nft.apply(delete_commands(self.opts))
        except NftError as exc:
            errors.append(str(exc))
        self._families = []
        self.installed = False
        if errors:
            raise TransparentError(f"removing transparent mode's routing failed: {'; '.join(errors)}")


def _names(path: str, fd: int) -> bool:
    """Does ``path`` still name the file open on ``fd``?"""
    try:
        st, fst = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


class SharedRouting:
    """The routing as every portproxy process of a namespace shares it: the daemon, a
    ``map --source client``, each docker-proxy drop-in of a port range.

    Each user holds a shared flock on one file per namespace and routing table while it
    needs the routing; the first installs it (``install`` is idempotent and takes over
    what is there), and on release the one that can turn its lock exclusive is the last
    user and removes it, and the lock file with it. So one process stopping never pulls
    the routing from under another's connections, and the last one leaves nothing behind.

    The file is unlinked only under the exclusive lock. A newcomer that opened it just
    before gets its shared lock on the unlinked file once the last user has finished, and
    sharing that with nobody; so every taker checks, once it holds the lock, that the
    path still names the file it locked, and starts over with a fresh file if not.
    """

    def __init__(self, opts: TransparentOptions | None = None) -> None:
        self.routing = TransparentRouting(opts)
        self.opts = self.routing.opts
        self._fd: int | None = None

    def _lock_path(self) -> str:
        from ..lock import RUN_DIR, netns_id

        return str(RUN_DIR / f"transparent-{netns_id()}-{self.opts.table}.lock")

    def acquire(self) -> None:
        """Take a share (waiting while a last user removes it) and make sure it is installed."""
        path = self._lock_path()
        while True:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise TransparentError(f"transparent mode cannot create {path}: {exc.strerror}") from None
            fcntl.flock(fd, fcntl.LOCK_SH)
            if _names(path, fd):
                break
            os.close(fd)  # the last user removed this file meanwhile: take a fresh one
        try:
            self.routing.install()
        except BaseException:
            self._leave(fd, remove=False)  # install left nothing of its own behind
            raise
        self._fd = fd

    def present(self) -> bool:
        return self.routing.present()

    def problem(self) -> str | None:
        """See :meth:`TransparentRouting.problem`."""
        return self.routing.problem()

    def install(self) -> None:
        """Put back what someone deleted (reconciling)."""
        self.routing.install()

    def release(self) -> None:
        """Give the share back; the last user removes the routing."""
        fd, self._fd = self._fd, None
        if fd is not None:
            self._leave(fd, remove=True)

    def _leave(self, fd: int, remove: bool) -> None:
        """Close ``fd``; if no other user holds a share, first remove the routing (with
        ``remove``) and the lock file, under the exclusive lock."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # others still use it
            return
        try:
            if remove:
                self.routing.remove()
        finally:
            try:
                os.unlink(self._lock_path())
            except OSError:
                pass
            os.close(fd)
