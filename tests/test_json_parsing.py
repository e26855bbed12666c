"""A large body is parsed by the standard library's parser: it must agree with orjson exactly."""

from typing import Any

import orjson
import pytest

from app.schemas import STDLIB_PARSE_MIN_BYTES, InvalidJSONError, parse_json

PADDING = b'"' + b"x" * STDLIB_PARSE_MIN_BYTES + b'"'

ODD_VALUES = [
    b"18446744073709551615",  # the largest unsigned 64-bit integer: an int
    b"18446744073709551616",  # one more: orjson makes it a float
    b"-9223372036854775808",
    b"-9223372036854775809",
    b"123456789012345678901234567890",
    b"-0",
    b"1.0",
    b"1E5",
    b"2.5e-7",
    b"1e400",  # infinite as a double: refused
    b"-1e400",
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"01",
    b"1.",
    b".5",
    b"+1",
    b"true",
    b"null",
    b"True",
    b'"\\ud800"',  # a lone surrogate: refused
    b'"\\udc00 x"',
    b'"\\ud83d\\ude00"',  # a pair: one character
    b'"\\u00e9\\n\\t\\"\\\\\\/"',
    b'"tab\tinside"',  # a raw control character: refused
    b'"\xc3\xa9"',
    b'"\xff"',  # not UTF-8
    b'"\xed\xa0\x80"',  # a surrogate encoded in UTF-8
    b'{"a": 1, "a": 2}',  # duplicate keys
    b'{"a": 1,}',
    b"[1, 2,]",
    b"[" * 1000 + b"]" * 1000,  # deeper than the standard parser's recursion limit
    b"[" * 1024 + b"]" * 1024,
    b"[" * 1025 + b"]" * 1025,
    b"'single'",
    b"[1] [2]",
]


def _outcome(parse: Any, body: bytes) -> object:
    try:
        value = parse(body)
    except (orjson.JSONDecodeError, InvalidJSONError):
        return "refused"
    return _typed(value)


def _typed(value: Any) -> list[object]:
    """The value as a flat list of tokens, each scalar with its type, so 1, 1.0 and True differ.

    Iterative, not recursive: some of the values nest deeper than Python's recursion limit.
    """
    tokens: list[object] = []
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, list):
            tokens.append(("list", len(item)))
            pending.extend(reversed(item))
        elif isinstance(item, dict):
            tokens.append(("dict", list(item)))
            pending.extend(reversed(item.values()))
        else:
            tokens.append((type(item).__name__, item))
    return tokens


@pytest.mark.parametrize("value", ODD_VALUES, ids=lambda value: repr(value[:30]))
@pytest.mark.parametrize("where", ["first", "last"])
def test_a_large_body_parses_exactly_as_orjson_parses_it(value: bytes, where: str) -> None:
    items = [value, PADDING] if where == "first" else [PADDING, value]
    body = b"[" + b", ".join(items) + b"]"
    assert len(body) > STDLIB_PARSE_MIN_BYTES
    assert _outcome(parse_json, body) == _outcome(orjson.loads, body)


@pytest.mark.parametrize(
    "prefix", [b"\xef\xbb\xbf", b"\xff\xfe", b" \n\r\t"], ids=["bom", "utf16-bom", "whitespace"]
)
def test_a_large_body_with_odd_bytes_before_it_parses_as_orjson_parses_it(prefix: bytes) -> None:
    body = prefix + b"[" + PADDING + b"]"
    assert _outcome(parse_json, body) == _outcome(orjson.loads, body)


def test_a_large_utf16_body_is_refused_as_orjson_refuses_it() -> None:
    body = ("[" + PADDING.decode() + "]").encode("utf-16-le")
    assert _outcome(parse_json, body) == _outcome(orjson.loads, body) == "refused"


def test_a_refused_large_body_gets_orjsons_message() -> None:
    body = b"[" + PADDING + b", NaN]"
    with pytest.raises(InvalidJSONError) as raised:
        parse_json(body)
    with pytest.raises(orjson.JSONDecodeError) as expected:
        orjson.loads(body)
    assert str(raised.value) == f"Request body is not valid JSON: {expected.value}"


def test_a_large_valid_body_is_parsed_without_orjson(monkeypatch: pytest.MonkeyPatch) -> None:
    """Otherwise the comparisons above would hold trivially."""

    def unused(body: bytes) -> None:
        raise AssertionError("orjson.loads was called")

    monkeypatch.setattr("app.schemas.orjson.loads", unused)
    body = b'[{"a": 1, "b": 2.5, "c": null, "d": "\\u00e9"}, ' + PADDING + b"]"
    assert parse_json(body) == [{"a": 1, "b": 2.5, "c": None, "d": "é"}, PADDING[1:-1].decode()]
