"""Go regexps (RE2 syntax) for ``~=`` selectors, matched by the RE2 engine in linear time.

containerd compiles ``~=`` values with Go's ``regexp``, an RE2 engine: matching never
backtracks, so no pattern can make a match take more than time linear in the text. Python's
``re`` backtracks (``^(a+)+$`` against 30 characters takes seconds), and a filter arrives from
any client, so berth matches with Google's RE2 (the ``google-re2`` bindings), whose syntax is
Go's: Perl classes and ``\\b`` are ASCII-only, ``$`` is the end of the text unless ``(?m)``,
``[[:alpha:]]``, ``\\pL``, ``\\Q...\\E``, flags ``imsU`` set mid-pattern, no backreferences
and no look-around.

Two constructs the C++ engine accepts and Go refuses are refused here first, so that such a
selector behaves as in containerd: ``\\C`` (any byte) and ``(?<name>...)`` (Go before 1.22).

Patterns and texts travel as UTF-8. Go reads each byte of text that is not UTF-8 as U+FFFD
(Python carries such bytes, and lone surrogates, as surrogate code points), so they become
U+FFFD here too; a pattern that is not UTF-8 is refused, as Go refuses it.
"""

from __future__ import annotations

import re2

__all__ = ["GoRegexp", "UnsupportedRegexp", "compile_go_regexp"]

# Bounds the compiled program, hence the cost of one match (program size x text length):
# a filter comes from any client. containerd's own filters are a few dozen characters.
MAX_PROGRAM_MEMORY = 1 << 20


class UnsupportedRegexp(ValueError):
    """A pattern Go's regexp package refuses."""


def _options() -> re2.Options:
    opts = re2.Options()
    opts.log_errors = False  # a client's bad pattern is the caller's to report
    opts.max_mem = MAX_PROGRAM_MEMORY
    return opts


_OPTIONS = _options()


def _to_bytes(text: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text).encode()


def _refuse_non_go(src: str) -> None:
    """Refuse what RE2 accepts and Go does not; everything else is left to RE2."""
    i, n = 0, len(src)
    in_class = False
    while i < n:
        c = src[i]
        if c == "\\":
            nxt = src[i + 1 : i + 2]
            if nxt == "Q" and not in_class:
                end = src.find("\\E", i + 2)
                if end < 0:
                    return
                i = end + 2
                continue
            if nxt == "C":
                raise UnsupportedRegexp("invalid escape sequence: \\C")
            i += 2
            continue
        if in_class:
            if src.startswith("[:", i):
                end = src.find(":]", i + 2)
                if end >= 0:
                    i = end + 2
                    continue
            if c == "]":
                in_class = False
            i += 1
            continue
        if c == "[":
            in_class = True
            i += 1
            # A "]" first in a class (after an optional "^") is a literal.
            if src.startswith("^", i):
                i += 1
            if src.startswith("]", i):
                i += 1
            continue
        if src.startswith("(?<", i):
            raise UnsupportedRegexp(f"invalid or unsupported Perl syntax: {src[i:i + 3]}")
        i += 1


class GoRegexp:
    """A compiled Go regexp; ``search`` tells whether it matches anywhere in a text."""

    __slots__ = ("pattern", "_search")

    def __init__(self, pattern: str) -> None:
        _refuse_non_go(pattern)
        try:
            compiled = re2.compile(pattern.encode(), _OPTIONS)
        except UnicodeEncodeError:
            raise UnsupportedRegexp("invalid UTF-8") from None
        except re2.error as exc:
            detail = exc.args[0] if exc.args else exc
            if isinstance(detail, bytes):
                detail = detail.decode("utf-8", "replace")
            raise UnsupportedRegexp(str(detail)) from None
        self.pattern = pattern
        self._search = compiled.search

    def search(self, text: str) -> bool:
        return self._search(_to_bytes(text)) is not None

    def __repr__(self) -> str:
        return f"GoRegexp({self.pattern!r})"


def compile_go_regexp(src: str) -> GoRegexp:
    """Compile a Go regexp; raises ``UnsupportedRegexp`` when Go would refuse it."""
    return GoRegexp(src)
