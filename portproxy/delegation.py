"""The delegation messages between the docker-proxy drop-in and ``portproxy serve``, both ends.

One connection to the daemon's delegate socket (SOCK_SEQPACKET) carries one request and
one answer, each a single JSON message:

* request, drop-in → daemon, with the bound socket attached (SCM_RIGHTS)::

      {"spec": "HOST_IP:PORT:CONTAINER_IP:CPORT/PROTO",
       "owner": {"kind": "docker", "id": "...", ...}, "options": {...}}

  ``options`` (the per-mapping options of dockerd's environment) only when there are any;
* answer, daemon → drop-in: ``{"ok": true}`` (the daemon serves the port),
  ``{"ok": false, "reason": "namespace"}`` (the socket is of another network namespace:
  serve in-process) or ``{"error": "one line"}`` (refused, and why).

Both ends encode and decode through this module only, so the format is written once.
It is pure and lean: the drop-in encodes the request and decodes the answer before it
reports readiness, when importing :mod:`json` (which brings :mod:`re`, ~30 ms) would slow
every port of a range, so those two directions use the small JSON writer and reader
below. The daemon decodes requests with :mod:`json`. Anything malformed is one
:class:`MalformedMessage` with one line saying what is wrong.

No version field: both ends ship in one package, and the daemon refuses any key it does
not know, so a mismatch is one clear error rather than a silent misreading.
"""

from __future__ import annotations

from .errors import BadInput

TYPE_CHECKING = False  # typing imports re: not on the drop-in's lean start
if TYPE_CHECKING:
    from typing import Any

MAX_REQUEST = 16 * 1024
"""Bytes of a request at most (a larger one is refused, not cut)."""
MAX_FDS = 4
"""More than one fd is refused, but a few are received so that extra ones are closed, not leaked."""
MAX_ANSWER = 4096
"""Bytes the drop-in reads of an answer."""
MAX_ERROR = 400
"""Characters of an error line in an answer at most (fewer where escapes would make the
answer longer than MAX_ANSWER: a longer message would reach the drop-in cut)."""
REQUEST_TIMEOUT = 10.0
"""Seconds a new connection has to send its request (the daemon's side)."""
ANSWER_TIMEOUT = 15.0
"""Seconds the drop-in waits for the answer; dockerd gives up on fd 3 after 16."""
OWNER_KIND = "docker"

OK, OTHER_NAMESPACE, REFUSED = "ok", "namespace", "refused"
"""The three kinds of answer."""


class MalformedMessage(BadInput):
    """A delegation message that is not one of the format's; the message is one line."""


class DelegationRequest:
    """A decoded request: the mapping's spec text, its owner and its per-mapping options (unchecked)."""

    __slots__ = ("spec", "owner", "options")

    def __init__(self, spec: str, owner: dict[str, Any], options: dict[str, Any]) -> None:
        self.spec, self.owner, self.options = spec, owner, options

    def __repr__(self) -> str:
        return f"DelegationRequest({self.spec!r}, {self.owner!r}, {self.options!r})"


# --- requests --------------------------------------------------------------------------------------
def encode_request(spec: str, owner: dict[str, Any], options: dict[str, Any] | None = None) -> bytes:
    """The request message; ``owner`` must name its ``kind`` (``docker``) and a non-empty ``id``."""
    body: dict[str, Any] = {"spec": spec, "owner": owner}
    if options:
        body["options"] = options
    return write_json(body).encode()


def decode_request(data: bytes) -> DelegationRequest:
    """The request message, its shape checked (the spec and options are the caller's to check)."""
    import json

    try:
        body = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise MalformedMessage("the request is not JSON") from None
    if not isinstance(body, dict) or not {"spec", "owner"} <= set(body) <= {"spec", "owner", "options"}:
        raise MalformedMessage('the request must be a JSON object with "spec", "owner" and maybe "options"')
    if not isinstance(body["spec"], str):
        raise MalformedMessage('"spec" must be a string')
    owner = body["owner"]
    if not isinstance(owner, dict) or owner.get("kind") != OWNER_KIND or not isinstance(owner.get("id"), str) \
            or not owner["id"]:
        raise MalformedMessage(f'"owner" must be an object with kind "{OWNER_KIND}" and an id')
    options = body.get("options", {})
    if not isinstance(options, dict):
        raise MalformedMessage('"options" must be an object')
    return DelegationRequest(body["spec"], owner, options)


# --- answers ---------------------------------------------------------------------------------------
def encode_answer(kind: str, error: str = "") -> bytes:
    """The answer of ``kind`` (OK, OTHER_NAMESPACE or REFUSED with its ``error`` line)."""
    if kind == OK:
        return b'{"ok": true}'
    if kind == OTHER_NAMESPACE:
        return b'{"ok": false, "reason": "namespace"}'
    if kind == REFUSED:
        error = error[:MAX_ERROR]
        while len(encoded := write_json({"error": error}).encode()) > MAX_ANSWER:
            error = error[:len(error) * MAX_ANSWER // len(encoded) - 1]  # escapes made it too long: cut
        return encoded
    raise ValueError(f"no answer of kind {kind!r}")


def decode_answer(data: bytes) -> tuple[str, str]:
    """(kind, error line) of an answer; MalformedMessage when it is none of the three, or empty
    (the daemon closed the connection without answering)."""
    if not data:
        raise MalformedMessage("the portproxy daemon closed the connection")
    try:
        body = read_flat_object(data.decode())
    except (UnicodeDecodeError, ValueError):
        body = None
    if body == {"ok": True}:
        return OK, ""
    if body == {"ok": False, "reason": "namespace"}:
        return OTHER_NAMESPACE, ""
    if body is not None and set(body) == {"error"} and isinstance(body["error"], str):
        return REFUSED, body["error"]
    text = data.decode("ascii", errors="replace").strip()
    raise MalformedMessage(f"the portproxy daemon answered {text[:200]!r}")


# --- a lean JSON writer and reader (no json, no re) ------------------------------------------------
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_HEX = set("0123456789abcdefABCDEF")
_SPACE = " \t\n\r"


def write_json(value: Any) -> str:
    """JSON text of str, bool, int, finite float, None, list/tuple and str-keyed dict values,
    ASCII only, as ``json.dumps`` writes it by default (``", "`` and ``": "`` separators)."""
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, str):
        return _write_string(value)
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{value!r} has no JSON form")
        return float.__repr__(value)
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError("JSON object keys must be strings")
        return "{" + ", ".join(f"{_write_string(k)}: {write_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(write_json(v) for v in value) + "]"
    raise TypeError(f"{type(value).__name__} has no JSON form here")


def _write_string(text: str) -> str:
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'  # the usual case: address text, digits, names
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        elif code > 0xFFFF:
            code -= 0x10000
            out.append(f"\\u{0xD800 | code >> 10:04x}\\u{0xDC00 | code & 0x3FF:04x}")
        else:
            out.append(f"\\u{code:04x}")
    out.append('"')
    return "".join(out)


def read_flat_object(text: str) -> dict[str, str | bool | None]:
    """A JSON object whose values are strings, booleans or null, in any valid JSON spelling
    (whitespace, escapes, surrogate pairs); ValueError for anything else."""
    i = _skip(text, 0)
    if text[i:i + 1] != "{":
        raise ValueError("not an object")
    result: dict[str, str | bool | None] = {}
    i = _skip(text, i + 1)
    if text[i:i + 1] == "}":
        i += 1
    else:
        while True:
            key, i = _read_string(text, i)
            i = _skip(text, i)
            if text[i:i + 1] != ":":
                raise ValueError("expected ':'")
            i = _skip(text, i + 1)
            if text[i:i + 1] == '"':
                value, i = _read_string(text, i)
                result[key] = value
            else:
                for word, literal in (("true", True), ("false", False), ("null", None)):
                    if text.startswith(word, i):
                        result[key] = literal
                        i += len(word)
                        break
                else:
                    raise ValueError("a value that is not a string, a boolean or null")
            i = _skip(text, i)
            if text[i:i + 1] == ",":
                i = _skip(text, i + 1)
                continue
            if text[i:i + 1] == "}":
                i += 1
                break
            raise ValueError("expected ',' or '}'")
    if _skip(text, i) != len(text):
        raise ValueError("text after the object")
    return result


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _SPACE:
        i += 1
    return i


def _read_string(text: str, i: int) -> tuple[str, int]:
    """The string literal at ``text[i]`` and the index after it."""
    if text[i:i + 1] != '"':
        raise ValueError("expected a string")
    i += 1
    out: list[str] = []
    while True:
        if i >= len(text):
            raise ValueError("an unterminated string")
        ch = text[i]
        if ch == '"':
            return "".join(out), i + 1
        if ord(ch) < 0x20:
            raise ValueError("a control character in a string")
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        escape = text[i + 1:i + 2]
        if escape in _UNESCAPES:
            out.append(_UNESCAPES[escape])
            i += 2
            continue
        code = _hex4(text, i + 2) if escape == "u" else None
        if code is None:
            raise ValueError("a bad escape in a string")
        i += 6
        if 0xD800 <= code < 0xDC00 and text[i:i + 2] == "\\u":
            low = _hex4(text, i + 2)
            if low is not None and 0xDC00 <= low < 0xE000:  # a surrogate pair is one character
                code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                i += 6
        out.append(chr(code))


def _hex4(text: str, i: int) -> int | None:
    digits = text[i:i + 4]
    return int(digits, 16) if len(digits) == 4 and set(digits) <= _HEX else None
