"""portmap's ``conditionsV4`` / ``conditionsV6``, accepted only in a form that cannot inject rules.

portmap pastes each condition string into its rules as nft (or iptables) syntax. portproxy
never builds rules from text, so it accepts a small grammar and turns it into match tuples
for :class:`portproxy.kernel.builders.KernelOptions`::

    CONDITION := L3 FIELD [OP] ADDRESS[/PREFIX]   (one or more, whitespace separated)
    L3        := ip (in conditionsV4) | ip6 (in conditionsV6)
    FIELD     := saddr | daddr
    OP        := == | !=                          (default ==)

e.g. ``"ip saddr != 10.0.0.0/8"``. Anything else (sets, interfaces, marks, iptables
options such as ``-s``) is refused with a message naming the condition, so a conflist
written for portmap fails loudly instead of publishing ports more widely than intended.
"""

from __future__ import annotations

import ipaddress

Condition = tuple[str, str, str, str]
"""(``ip``|``ip6``, ``saddr``|``daddr``, ``==``|``!=``, CIDR)."""

FIELDS = ("saddr", "daddr")
OPS = ("==", "!=")


class ConditionError(ValueError):
    """A condition outside the accepted grammar; the message names it."""


def parse_conditions(conditions: object, family: int) -> tuple[Condition, ...]:
    """Parse portmap's list of condition strings for one family (4 or 6)."""
    if conditions is None:
        return ()
    key = f"conditionsV{family}"
    if not isinstance(conditions, list) or not all(isinstance(c, str) for c in conditions):
        raise ConditionError(f"{key} must be a list of strings")
    parsed: list[Condition] = []
    for text in conditions:
        parsed += _parse_one(text, family, key)
    return tuple(parsed)


def _parse_one(text: str, family: int, key: str) -> list[Condition]:
    l3 = "ip" if family == 4 else "ip6"
    words = text.split()
    if not words:
        raise ConditionError(f"{key}: empty condition")
    out: list[Condition] = []
    i = 0
    while i < len(words):
        if words[i] != l3:
            raise ConditionError(f"{key}: {text!r} is not supported (accepted: '{l3} saddr|daddr [!=] ADDRESS[/LEN]')")
        if i + 2 >= len(words):
            raise ConditionError(f"{key}: {text!r} is incomplete (expected '{l3} saddr|daddr [!=] ADDRESS[/LEN]')")
        field = words[i + 1]
        if field not in FIELDS:
            raise ConditionError(f"{key}: {text!r}: field {field!r} is not supported (use saddr or daddr)")
        op = "=="
        j = i + 2
        if words[j] in OPS:
            op = words[j]
            j += 1
        if j >= len(words):
            raise ConditionError(f"{key}: {text!r} is incomplete (address missing)")
        try:
            net = ipaddress.ip_network(words[j], strict=False)
        except ValueError:
            raise ConditionError(f"{key}: {text!r}: {words[j]!r} is not an address or prefix") from None
        if net.version != family:
            raise ConditionError(f"{key}: {text!r}: {words[j]!r} is not an IPv{family} address")
        out.append((l3, field, op, str(net)))
        i = j + 1
    return out
