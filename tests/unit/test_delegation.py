"""The delegation messages (portproxy.delegation): both directions, both ends, malformed input. No root."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from portproxy import delegation
from portproxy.delegation import (OK, OTHER_NAMESPACE, REFUSED, MalformedMessage, decode_answer, decode_request,
                                  encode_answer, encode_request, read_flat_object, write_json)

OWNER = {"kind": "docker", "id": "docker-proxy-7-0.0.0.0:9090/tcp", "name": "docker-proxy[7]",
         "container": "172.17.0.2:80"}
scalars = st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.text() \
    | st.floats(allow_nan=False, allow_infinity=False)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(), inner, max_size=4), max_leaves=12)


def test_a_request_round_trips() -> None:
    for options in (None, {}, {"target_cc": "bbr", "source": "client"}):
        request = decode_request(encode_request("0.0.0.0:9090:172.17.0.2:80/tcp", OWNER, options))
        assert (request.spec, request.owner, request.options) == ("0.0.0.0:9090:172.17.0.2:80/tcp", OWNER,
                                                                  options or {})
    # No options, no key: the message stays what older daemons read.
    assert "options" not in json.loads(encode_request("9090:1.2.3.4:80", OWNER))


@given(values)
def test_the_lean_writer_writes_what_json_dumps_writes(value) -> None:
    assert write_json(value) == json.dumps(value)


@given(st.dictionaries(st.text(), st.text() | st.booleans() | st.none(), max_size=6),
       st.sampled_from([{}, {"indent": 2}, {"ensure_ascii": False}, {"separators": (",", ":")}]))
def test_the_lean_reader_reads_any_spelling_json_writes(body, style) -> None:
    assert read_flat_object(json.dumps(body, **style)) == body


@given(st.text(max_size=500))
def test_every_error_line_survives_the_answer(error) -> None:
    encoded = encode_answer(REFUSED, error)
    kind, line = decode_answer(encoded)
    assert kind == REFUSED and error.startswith(line) and len(encoded) <= delegation.MAX_ANSWER
    if error.isascii() and error.isprintable():
        assert line == error[:delegation.MAX_ERROR]


def test_answers_round_trip_and_fit_the_drop_ins_read() -> None:
    assert decode_answer(encode_answer(OK)) == (OK, "")
    assert decode_answer(encode_answer(OTHER_NAMESPACE)) == (OTHER_NAMESPACE, "")
    worst = encode_answer(REFUSED, "\U0001F600" * 1000)  # 12 bytes a character once escaped
    line = decode_answer(worst)[1]
    assert len(worst) <= delegation.MAX_ANSWER and len(line) > 300 and set(line) == {"\U0001F600"}
    # The daemon's answers are plain JSON, whatever the spelling.
    assert decode_answer(b' { "ok" :true } ') == (OK, "")
    assert decode_answer(json.dumps({"error": 'port "9090" \u00e9 in use\\'}, ensure_ascii=False).encode()) \
        == (REFUSED, 'port "9090" \u00e9 in use\\')
    with pytest.raises(ValueError):
        encode_answer("maybe")


@pytest.mark.parametrize("data, message", [
    (b"", "closed the connection"),
    (b"{nope", "answered '{nope'"),
    (b'{"ok": true} trailing', "answered"),
    (b'{"ok": 1}', "answered"),
    (b'{"ok": false}', "answered"),
    (b'{"error": 3}', "answered"),
    (b'{"error": "x", "ok": true}', "answered"),
    (b'{"error": "\\x"}', "answered"),
    (b'{"error": "unterminated}', "answered"),
    (b"[1, 2]", "answered"),
    (b"\xff\xfe", "answered"),
])
def test_a_malformed_answer_is_one_line(data, message) -> None:
    with pytest.raises(MalformedMessage, match="^the portproxy daemon ") as caught:
        decode_answer(data)
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("data, message", [
    (b"{nope", "not JSON"),
    (b"\xff", "not JSON"),
    (b"[" * 100000, "not JSON"),
    (b"[]", '"spec", "owner"'),
    (b'{"spec": "9094:1.2.3.4:80"}', '"spec", "owner"'),
    (b'{"spec": "9094:1.2.3.4:80", "owner": {}, "extra": 1}', '"spec", "owner"'),
    (b'{"spec": 9094, "owner": {}}', '"spec" must be a string'),
    (b'{"spec": "9094:1.2.3.4:80", "owner": {"kind": "cni", "id": "x"}}', 'kind "docker"'),
    (b'{"spec": "9094:1.2.3.4:80", "owner": {"kind": "docker", "id": ""}}', "and an id"),
    (b'{"spec": "9094:1.2.3.4:80", "owner": {"kind": "docker", "id": "x"}, "options": []}',
     '"options" must be an object'),
])
def test_a_malformed_request_is_one_line(data, message) -> None:
    with pytest.raises(MalformedMessage) as caught:
        decode_request(data)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_values_without_a_json_form_are_refused() -> None:
    for value in (float("nan"), float("inf"), {1: "x"}, object()):
        with pytest.raises((TypeError, ValueError)):
            write_json(value)


def test_the_drop_ins_half_imports_neither_json_nor_re() -> None:
    """Encoding a request and decoding an answer happen before the drop-in reports readiness."""
    code = ("import sys; from portproxy import delegation as d; "
            "d.encode_request('0.0.0.0:1:1.2.3.4:2/tcp', {'kind': 'docker', 'id': 'x'}, {'a': '\\u00e9'}); "
            "d.decode_answer(b'{\"error\": \"x\"}'); "
            "print(sorted({'json', 're', 'typing', 'enum'} & set(sys.modules)))")
    env = {"PYTHONPATH": str(Path(delegation.__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True, env=env)
    assert done.stdout.strip() == "[]"
