"""containerd's identifier rule and Go's %q quoting of the offending value."""

from __future__ import annotations

import pytest

from berth.core.errdefs import Code, InvalidArgument
from berth.core.identifiers import MAX_LENGTH, PATTERN, go_quote, is_valid, validate

MUST_MATCH = "must match ^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$"


@pytest.mark.parametrize(
    "ident",
    [
        "default",
        "Default",
        "k8s.io",
        "moby",
        "a",
        "0",
        "0912341234",
        "a_b",
        "a-b.c_d",
        "task.0.0123456789",
        "container.system-75-f19a.00",
        "x" * MAX_LENGTH,
    ],
)
def test_valid(ident: str) -> None:
    validate(ident)
    assert is_valid(ident)


@pytest.mark.parametrize(
    ("ident", "message"),
    [
        ("", "identifier must not be empty"),
        ("a..b", f'identifier "a..b" {MUST_MATCH}'),
        (".a", f'identifier ".a" {MUST_MATCH}'),
        ("a.", f'identifier "a." {MUST_MATCH}'),
        ("-a", f'identifier "-a" {MUST_MATCH}'),
        ("a-", f'identifier "a-" {MUST_MATCH}'),
        ("a--b", f'identifier "a--b" {MUST_MATCH}'),
        ("a.-b", f'identifier "a.-b" {MUST_MATCH}'),
        ("a__b", f'identifier "a__b" {MUST_MATCH}'),
        ("a/b", f'identifier "a/b" {MUST_MATCH}'),
        ("a/..", f'identifier "a/.." {MUST_MATCH}'),
        ("a b", f'identifier "a b" {MUST_MATCH}'),
        # Python's `$` would accept a final newline; Go's does not.
        ("a\n", f'identifier "a\\n" {MUST_MATCH}'),
        ('say"hi"', f'identifier "say\\"hi\\"" {MUST_MATCH}'),
        ("tab\there", f'identifier "tab\\there" {MUST_MATCH}'),
        ("nul\x00", f'identifier "nul\\x00" {MUST_MATCH}'),
        ("é", f'identifier "é" {MUST_MATCH}'),
        # Go counts bytes: 38 two-byte letters fit the limit, 39 do not.
        ("é" * 38, f'identifier "{"é" * 38}" {MUST_MATCH}'),
        (
            "é" * 39,
            f'identifier "{"é" * 39}" greater than maximum length (76 characters)',
        ),
        (
            "x" * (MAX_LENGTH + 1),
            f'identifier "{"x" * 77}" greater than maximum length (76 characters)',
        ),
    ],
)
def test_invalid(ident: str, message: str) -> None:
    assert not is_valid(ident)
    with pytest.raises(InvalidArgument) as info:
        validate(ident)
    assert str(info.value) == f"{message}: invalid argument"
    assert info.value.code == Code.INVALID_ARGUMENT


def test_pattern_is_the_text_containerd_prints() -> None:
    assert PATTERN == "^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$"


@pytest.mark.parametrize(
    ("value", "quoted"),
    [
        ("", '""'),
        ("plain text", '"plain text"'),
        ('q"', '"q\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("\a\b\f\n\r\t\v", '"\\a\\b\\f\\n\\r\\t\\v"'),
        ("\x00\x1b\x7f", '"\\x00\\x1b\\x7f"'),
        ("é牛", '"é牛"'),
        ("\U0001f600", '"\U0001f600"'),  # a symbol: printable
        ("\u00a0", '"\\u00a0"'),  # no-break space: not printable for Go
        ("\u200b\u00ad", '"\\u200b\\u00ad"'),  # format characters
        ("\U000e0001", '"\\U000e0001"'),
        ("\ue000", '"\\ue000"'),  # private use
        ("a\udcffb", '"a\\xffb"'),  # a byte that was not UTF-8
        ("\ud800", '"\\xed\\xa0\\x80"'),
    ],
)
def test_go_quote(value: str, quoted: str) -> None:
    assert go_quote(value) == quoted
