"""The one error hierarchy: every failure a user can cause or meet is a :class:`PortproxyError`.

Each class carries the exit status a command ends with and the HTTP status the
control API answers with, so no call site keeps its own table of unrelated exception
classes: the CLI catches ``PortproxyError`` and exits with ``exc.exit_status``, the
API answers ``exc.http_status``. The message is always one readable line (no
traceback ever reaches a user for bad input).

=================  ====  ====  =====================================================
class              exit  HTTP  for
=================  ====  ====  =====================================================
BadInput           2     400   a malformed spec, option, config, request
NotFound           1     404   no such mapping
Conflict           1     409   port in use, overlapping mappings, ambiguous name
SystemFailure      1     500   the kernel or the disk refused (nft, sysctl, netlink)
Unavailable        1     503   a facility is missing (no CAP_NET_ADMIN, no libnftables)
=================  ====  ====  =====================================================
"""

from __future__ import annotations

MAX_ECHO = 80
"""Characters of user input an error message quotes at most (a 900 KB spec is not echoed)."""


def shorten(text: object, limit: int = MAX_ECHO) -> str:
    """``repr(text)``, cut to ``limit`` characters with an ellipsis."""
    shown = repr(text)
    return shown if len(shown) <= limit else f"{shown[:limit - 4]}...{shown[-1]}"


class PortproxyError(Exception):
    """Base of every user-facing error; the message is one line."""

    exit_status = 1
    http_status = 500


class BadInput(PortproxyError, ValueError):
    exit_status = 2
    http_status = 400


class NotFound(PortproxyError):
    http_status = 404


class Conflict(PortproxyError):
    http_status = 409


class SystemFailure(PortproxyError):
    http_status = 500


class Unavailable(PortproxyError):
    http_status = 503
