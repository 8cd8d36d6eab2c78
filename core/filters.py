"""containerd's filter language: parse an expression once, match it against many objects.

An expression is a comma-separated list of selectors, all of which must hold::

    topic=="/tasks/exit",namespace==default
    labels."io.example/role"==web,image~=^docker.io/
    labels.tier                      (presence test)

A selector is a field path (components joined by ``.``, each a bare word or a ``"``-quoted
string with Go escapes), optionally followed by an operator (``==``, ``!=``, ``~=``) and a
value (a bare word running to the next ``,`` or space, or a quoted string; after ``~=`` the
value may also be quoted with ``/`` or ``|`` so that a regexp needs no double escaping).
A list of expressions (``parse_all``) matches when any of them does. There is no OR operator
inside one expression: ``|`` is a quote character in containerd's grammar.

Matching goes through an *adaptor*: any callable taking the field path as a tuple and
returning ``(value, present)``, the contract of containerd's ``Adaptor.Field``.
``adapt_mapping`` builds one for plain nested dicts.

The scanner and parser follow containerd's state machine closely, including its quirks
(trailing spaces after a value are an error, an invalid regexp is not a parse error but never
matches), because clients see these outcomes and its error messages verbatim. Error positions
count characters where containerd counts bytes; the two only differ for non-ASCII input.
"""

from __future__ import annotations

import re
import unicodedata
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from berth.core import log
from berth.core.errdefs import InvalidArgument

__all__ = [
    "ALWAYS",
    "Adaptor",
    "AllOf",
    "AnyOf",
    "Filter",
    "Selector",
    "adapt_mapping",
    "parse",
    "parse_all",
]

Adaptor = Callable[[tuple[str, ...]], tuple[str, bool]]

_log = log.get("filters")


# --------------------------------------------------------------------------- filters


class Filter:
    """Decides whether the object seen through an adaptor matches."""

    __slots__ = ()

    def match(self, adaptor: Adaptor) -> bool:
        raise NotImplementedError


class _Always(Filter):
    __slots__ = ()

    def match(self, adaptor: Adaptor) -> bool:
        return True

    def __repr__(self) -> str:
        return "ALWAYS"


ALWAYS: Filter = _Always()


class AnyOf(Filter):
    """Matches when at least one of its filters matches."""

    __slots__ = ("filters",)

    def __init__(self, filters: Sequence[Filter]) -> None:
        self.filters = tuple(filters)

    def match(self, adaptor: Adaptor) -> bool:
        for f in self.filters:
            if f.match(adaptor):
                return True
        return False

    def __repr__(self) -> str:
        return f"AnyOf({list(self.filters)!r})"


class AllOf(Filter):
    """Matches when every one of its filters matches (an empty one always matches)."""

    __slots__ = ("filters",)

    def __init__(self, filters: Sequence[Filter]) -> None:
        self.filters = tuple(filters)

    def match(self, adaptor: Adaptor) -> bool:
        for f in self.filters:
            if not f.match(adaptor):
                return False
        return True

    def __repr__(self) -> str:
        return f"AllOf({list(self.filters)!r})"


class Selector(Filter):
    """One ``<fieldpath>[<operator><value>]`` test. ``operator`` is ``?`` for presence."""

    __slots__ = ("fieldpath", "value")
    operator = "?"

    def __init__(self, fieldpath: tuple[str, ...], value: str = "") -> None:
        self.fieldpath = fieldpath
        self.value = value

    def __repr__(self) -> str:
        return f"Selector({self.fieldpath!r}, {self.operator!r}, {self.value!r})"


class _Present(Selector):
    __slots__ = ()

    def match(self, adaptor: Adaptor) -> bool:
        return adaptor(self.fieldpath)[1]


class _Equal(Selector):
    __slots__ = ()
    operator = "=="

    def match(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(self.fieldpath)
        return present and value == self.value


class _NotEqual(Selector):
    __slots__ = ()
    operator = "!="

    # containerd compares the returned value even for an absent field (usually ""), so
    # an absent field is "not equal" to any non-empty value.
    def match(self, adaptor: Adaptor) -> bool:
        return adaptor(self.fieldpath)[0] != self.value


class _Matches(Selector):
    __slots__ = ("_search",)
    operator = "~="

    def __init__(self, fieldpath: tuple[str, ...], value: str) -> None:
        super().__init__(fieldpath, value)
        try:
            self._search: Callable[[str], Any] | None = compile_go_regexp(value).search
        except (ValueError, re.error) as exc:
            # containerd accepts the filter and lets the selector never match.
            _log.error("invalid regexp in filter", regexp=value, error=str(exc))
            self._search = None

    def match(self, adaptor: Adaptor) -> bool:
        if self._search is None:
            return False
        return self._search(adaptor(self.fieldpath)[0]) is not None


_SELECTORS: dict[str, type[Selector]] = {"==": _Equal, "!=": _NotEqual, "~=": _Matches}


# --------------------------------------------------------------------------- adaptors

_ABSENT = ("", False)


def adapt_mapping(
    obj: Mapping[str, Any], *, string_maps: Collection[str] = ("labels", "annotations")
) -> Adaptor:
    """An adaptor over nested dicts, following the conventions of containerd's adaptors.

    - A string is present when non-empty (proto3 cannot tell unset from empty); path
      components after a string are ignored, as containerd's generated adaptors do.
    - A mapping stored under a name in ``string_maps`` is a label map: the rest of the path
      joined with ``.`` is the key (``labels.a.b`` finds label ``a.b``), an existing key is
      present even with an empty value, and an empty map has nothing present.
    - Any other mapping is a nested message: the path descends into it; the message itself
      is not a value.
    - Other values (numbers, lists, None) are not filterable, like in containerd: turn them
      into strings first if a service wants them to be.
    """

    def field(fieldpath: tuple[str, ...]) -> tuple[str, bool]:
        node: Mapping[str, Any] = obj
        last = len(fieldpath) - 1
        for i, name in enumerate(fieldpath):
            value = node.get(name)
            if isinstance(value, str):
                return value, value != ""
            if not isinstance(value, Mapping):
                return _ABSENT
            if name in string_maps:
                if not value:
                    return _ABSENT
                found = value.get(".".join(fieldpath[i + 1 :]))
                return (found, True) if isinstance(found, str) else _ABSENT
            if i == last:
                return _ABSENT
            node = value
        return _ABSENT

    return field


# --------------------------------------------------------------------------- parsing


def parse(expr: str) -> Filter:
    """Compile one expression. The empty expression matches everything.

    Raises ``InvalidArgument`` with containerd's wording, e.g.
    ``filters: parse error: [labels. >|?|< x]: expected field or quoted: invalid argument``.
    """
    if expr == "":
        return ALWAYS
    return _Parser(expr).parse()


def parse_all(exprs: Sequence[str]) -> Filter:
    """Compile a list of expressions that matches when any of them matches.

    An empty list matches everything, as containerd's ``ParseAll``.
    """
    if isinstance(exprs, str):
        raise TypeError("parse_all takes a sequence of expressions, not one string")
    filters = [parse(e) for e in exprs]
    if not filters or any(f is ALWAYS for f in filters):
        return ALWAYS
    if len(filters) == 1:
        return filters[0]
    return AnyOf(filters)


# Token kinds share one space with the characters the scanner returns (which are
# one-character strings), as in containerd's scanner: anything else it meets is returned
# as that character itself.
_EOF = -1
_QUOTED = -2
_VALUE = -3
_FIELD = -4
_SEPARATOR = -5
_OPERATOR = -6
_ILLEGAL = -7

Rune = str | int

# Go's unicode.IsSpace.
_SPACES = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
    + "".join(chr(c) for c in range(0x2000, 0x200B))
)
_FIELD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_QUOTES = frozenset('/|"')
_OPERATOR_CHARS = frozenset("=!~")
_HEX = {c: int(c, 16) for c in "0123456789abcdefABCDEF"}


def _is_value_char(ch: Rune) -> bool:
    if not isinstance(ch, str) or ch == "," or ch in _SPACES:
        return False
    if "!" <= ch <= "~":
        return True
    # Go's unicode.IsGraphic minus spaces: letters, marks, numbers, punctuation, symbols.
    return unicodedata.category(ch)[0] in "LMNPS"


def _digit_value(ch: Rune) -> int:
    if isinstance(ch, str):
        return _HEX.get(ch, 16)
    return 16


class _Scanner:
    """containerd's filter scanner: ``pos`` starts the current character, ``ppos`` ends it."""

    __slots__ = ("text", "pos", "ppos", "value", "err")

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.ppos = 0
        self.value = False  # the next bare word is a value, not a field
        self.err = ""  # the first error only: later ones are consequences

    def error(self, msg: str) -> None:
        if not self.err:
            self.err = msg

    def next(self) -> Rune:
        if self.ppos >= len(self.text):
            self.pos = len(self.text)
            return _EOF
        self.pos = self.ppos
        ch = self.text[self.ppos]
        self.ppos += 1
        # Surrogates are how Python carries bytes that were not UTF-8; containerd also
        # refuses a literal U+FFFD since it cannot tell it from a decoding error.
        if ch == "\ufffd" or "\ud800" <= ch <= "\udfff":
            self.error("rune error")
            return _ILLEGAL
        if ch == "\x00":
            self.error("unexpected null")
            return _ILLEGAL
        return ch

    def peek(self) -> Rune:
        pos, ppos = self.pos, self.ppos
        ch = self.next()
        self.pos, self.ppos = pos, ppos
        return ch

    def scan(self) -> tuple[int, Rune, str]:
        ch = self.next()
        pos = self.pos
        while True:
            if isinstance(ch, int):
                return self.pos, ch, ""
            if ch in _QUOTES:
                kind = _QUOTED if self._scan_quoted(ch) else _ILLEGAL
                return pos, kind, self.text[pos : self.ppos]
            if ch == "," or ch == ".":
                self.value = False
                return pos, _SEPARATOR, ch
            if ch in _OPERATOR_CHARS:
                while self.peek() in _OPERATOR_CHARS:
                    self.next()
                self.value = True
                return pos, _OPERATOR, self.text[pos : self.ppos]
            if ch in _SPACES:
                ch = self.next()
                pos = self.pos
                continue
            if self.value:
                while _is_value_char(self.peek()):
                    self.next()
                self.value = False
                return pos, _VALUE, self.text[pos : self.ppos]
            if ch in _FIELD_CHARS:
                while self.peek() in _FIELD_CHARS:
                    self.next()
                return pos, _FIELD, self.text[pos : self.ppos]
            return self.pos, ch, ""

    def _scan_quoted(self, quote: str) -> bool:
        legal = True
        ch = self.next()
        while ch != quote:
            if ch == "\n" or isinstance(ch, int):
                self.error("quoted literal not terminated")
                return False
            if ch == "\\":
                ch, ok = self._scan_escape(quote)
                legal = legal and ok
            else:
                ch = self.next()
        return legal

    def _scan_escape(self, quote: str) -> tuple[Rune, bool]:
        ch = self.next()
        if isinstance(ch, str):
            if ch in "abfnrtv\\" or ch == quote:
                return self.next(), True
            if ch in "01234567":
                return self._scan_digits(ch, 8, 3)
            width = {"x": 2, "u": 4, "U": 8}.get(ch)
            if width is not None:
                return self._scan_digits(self.next(), 16, width)
        self.error("illegal escape sequence")
        return ch, False

    def _scan_digits(self, ch: Rune, base: int, n: int) -> tuple[Rune, bool]:
        while n > 0 and _digit_value(ch) < base:
            ch = self.next()
            n -= 1
        if n > 0:
            self.error("illegal numeric escape sequence")
            return ch, False
        return ch, True


class _QuoteSyntaxError(ValueError):
    def __str__(self) -> str:
        return "quote syntax error"


def _unquote(token: str) -> str:
    """Decode a quoted token (Go string syntax, with ``/`` and ``|`` as extra quotes).

    ``\\x`` and octal escapes produce raw bytes, as in Go; bytes that do not form UTF-8
    come back as surrogate escapes.
    """
    quote = token[0]
    if len(token) < 2 or token[-1] != quote or quote not in "\"'/|":
        raise _QuoteSyntaxError
    body = token[1:-1]
    if "\n" in body:
        raise _QuoteSyntaxError
    if "\\" not in body and quote not in body:
        return body
    out = bytearray()
    i, n = 0, len(body)
    while i < n:
        c = body[i]
        if c == quote:
            raise _QuoteSyntaxError
        if c != "\\":
            out += c.encode()
            i += 1
            continue
        if i + 1 >= n:
            raise _QuoteSyntaxError
        e = body[i + 1]
        i += 2
        simple = _SIMPLE_ESCAPES.get(e)
        if simple is not None:
            out.append(simple)
        elif e in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[e]
            digits = body[i : i + width]
            if len(digits) < width or any(d not in _HEX for d in digits):
                raise _QuoteSyntaxError
            i += width
            v = int(digits, 16)
            if e == "x":
                out.append(v)
            elif v > 0x10FFFF:
                raise _QuoteSyntaxError
            else:
                # Go encodes a surrogate code point as the replacement character.
                out += ("\ufffd" if 0xD800 <= v <= 0xDFFF else chr(v)).encode()
        elif e in "01234567":
            digits = body[i - 1 : i + 2]
            if len(digits) < 3 or any(d not in "01234567" for d in digits):
                raise _QuoteSyntaxError
            i += 2
            v = int(digits, 8)
            if v > 255:
                raise _QuoteSyntaxError
            out.append(v)
        elif e in "'\"|/" and e == quote:
            out.append(ord(e))
        else:
            raise _QuoteSyntaxError
    return out.decode("utf-8", "surrogateescape")


_SIMPLE_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92}


class _Parser:
    __slots__ = ("text", "scanner")

    def __init__(self, text: str) -> None:
        self.text = text
        self.scanner = _Scanner(text)

    def error(self, pos: int, msg: str) -> InvalidArgument:
        text = self.text
        if pos < len(text):
            where = f"[{text[:pos]} >|{text[pos]}|< {text[pos + 1:]}]"
        else:
            where = f"[{text}]"
        return InvalidArgument(f"filters: parse error: {where}: {msg}")

    def parse(self) -> Filter:
        selectors = [self.selector()]
        sc = self.scanner
        while True:
            ch = sc.peek()
            if ch == _EOF:
                break
            if ch != ",":
                shown = "\ufffd" if isinstance(ch, int) else ch
                raise self.error(sc.ppos, f"unexpected input: {shown}")
            sc.scan()
            selectors.append(self.selector())
        return selectors[0] if len(selectors) == 1 else AllOf(selectors)

    def selector(self) -> Selector:
        fieldpath = self.fieldpath()
        ch = self.scanner.peek()
        if ch == "," or ch == _EOF:
            return _Present(fieldpath)
        op = self.operator()
        value = self.value(allow_alt_quotes=op == "~=")
        return _SELECTORS[op](fieldpath, value)

    def fieldpath(self) -> tuple[str, ...]:
        fields = [self.field()]
        while self.scanner.peek() == ".":
            self.scanner.scan()
            fields.append(self.field())
        return tuple(fields)

    def field(self) -> str:
        pos, tok, text = self.scanner.scan()
        if tok == _FIELD:
            return text
        if tok == _QUOTED:
            return self.unquote(pos, text, allow_alts=False)
        if tok == _ILLEGAL:
            raise self.error(pos, self.scanner.err)
        raise self.error(pos, "expected field or quoted")

    def operator(self) -> str:
        pos, tok, text = self.scanner.scan()
        if tok == _OPERATOR:
            if text in _SELECTORS:
                return text
            # Operators hold only "=!~", so Go's %q is plain double quoting here.
            raise self.error(pos, f'unsupported operator "{text}"')
        if tok == _ILLEGAL:
            raise self.error(pos, self.scanner.err)
        raise self.error(pos, 'expected an operator ("=="|"!="|"~=")')

    def value(self, *, allow_alt_quotes: bool) -> str:
        pos, tok, text = self.scanner.scan()
        if tok == _VALUE or tok == _FIELD:
            return text
        if tok == _QUOTED:
            return self.unquote(pos, text, allow_alts=allow_alt_quotes)
        if tok == _ILLEGAL:
            raise self.error(pos, self.scanner.err)
        raise self.error(pos, "expected value or quoted")

    def unquote(self, pos: int, text: str, *, allow_alts: bool) -> str:
        if not allow_alts and text[0] not in "'\"":
            raise self.error(pos, "invalid quote encountered")
        try:
            return _unquote(text)
        except _QuoteSyntaxError as exc:
            raise self.error(pos, f"unquoting failed: {exc}") from None


# --------------------------------------------------------------------------- Go regexps
#
# containerd matches with Go's RE2 syntax; Python's re differs in a few places that a filter
# can plausibly hit. The translation below keeps Go's meaning for: ASCII-only \d \s \w \b,
# `$` (end of text only, unless (?m)), \z, \Q...\E, [[:class:]], \x{...}, octal escapes,
# braces that are not a valid repeat (literal in Go), and (?flags) in mid-pattern (Python
# wants them at the start). Constructs Go rejects (backreferences, look-around, possessive
# or stacked repeats...) are rejected too, so such a selector never matches, as in
# containerd. Unicode classes (\pL) have no Python equivalent and are rejected as well.


class UnsupportedRegexp(ValueError):
    """A pattern Go refuses, or that Python's re cannot express."""


_ASCII_CLASSES: dict[str, tuple[tuple[int, int], ...]] = {
    "alnum": ((0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A)),
    "alpha": ((0x41, 0x5A), (0x61, 0x7A)),
    "ascii": ((0x00, 0x7F),),
    "blank": ((0x09, 0x09), (0x20, 0x20)),
    "cntrl": ((0x00, 0x1F), (0x7F, 0x7F)),
    "digit": ((0x30, 0x39),),
    "graph": ((0x21, 0x7E),),
    "lower": ((0x61, 0x7A),),
    "print": ((0x20, 0x7E),),
    "punct": ((0x21, 0x2F), (0x3A, 0x40), (0x5B, 0x60), (0x7B, 0x7E)),
    "space": ((0x09, 0x0D), (0x20, 0x20)),
    "upper": ((0x41, 0x5A),),
    "word": ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)),
    "xdigit": ((0x30, 0x39), (0x41, 0x46), (0x61, 0x66)),
}
# Go's Perl classes are ASCII-only; its \s leaves out \v.
_PERL_CLASSES = {
    "d": _ASCII_CLASSES["digit"],
    "s": ((0x09, 0x0A), (0x0C, 0x0D), (0x20, 0x20)),
    "w": _ASCII_CLASSES["word"],
}
_REPEAT = re.compile(r"\{(0|[1-9][0-9]*)(,(0|[1-9][0-9]*)?)?\}")
_FLAG_GROUP = re.compile(r"\(\?([A-Za-z]*)(?:-([A-Za-z]*))?([:)])")
_OCTAL = "01234567"
_MAX_REPEAT = 1000


def _char(cp: int) -> str:
    if cp < 0x100:
        return f"\\x{cp:02x}"
    if cp < 0x10000:
        return f"\\u{cp:04x}"
    return f"\\U{cp:08x}"


def _class_body(ranges: tuple[tuple[int, int], ...], negate: bool) -> str:
    if negate:
        complement, start = [], 0
        for lo, hi in ranges:
            if lo > start:
                complement.append((start, lo - 1))
            start = hi + 1
        complement.append((start, 0x10FFFF))
        ranges = tuple(complement)
    return "".join(_char(lo) if lo == hi else f"{_char(lo)}-{_char(hi)}" for lo, hi in ranges)


def _escape(src: str, i: int, in_class: bool) -> tuple[str, int]:
    """Translate the escape starting at ``src[i] == '\\\\'``; return it and the next index."""
    if i + 1 >= len(src):
        raise UnsupportedRegexp("trailing backslash at end of expression")
    c = src[i + 1]
    j = i + 2
    if c in _OCTAL:
        if c != "0" and (j >= len(src) or src[j] not in _OCTAL):
            raise UnsupportedRegexp(f"invalid escape sequence: \\{c} (no backreferences)")
        digits = c
        while len(digits) < 3 and j < len(src) and src[j] in _OCTAL:
            digits += src[j]
            j += 1
        return _char(int(digits, 8)), j
    if c == "x":
        if src.startswith("{", j):
            end = src.find("}", j)
            digits = src[j + 1 : end] if end > 0 else ""
            if not digits or any(d not in _HEX for d in digits) or int(digits, 16) > 0x10FFFF:
                raise UnsupportedRegexp("invalid escape sequence: \\x{")
            return _char(int(digits, 16)), end + 1
        digits = src[j : j + 2]
        if len(digits) < 2 or any(d not in _HEX for d in digits):
            raise UnsupportedRegexp("invalid escape sequence: \\x")
        return _char(int(digits, 16)), j + 2
    if c in "afnrtv":
        return "\\" + c, j
    if c in "dDsSwW":
        body = _class_body(_PERL_CLASSES[c.lower()], c.isupper())
        return (body if in_class else f"[{body}]"), j
    if c in "pP":
        raise UnsupportedRegexp("Unicode classes (\\p) are not supported")
    if not in_class:
        if c == "A":
            return "\\A", j
        if c == "z":
            return "\\Z", j
        if c in "bB":
            return f"(?a:\\{c})", j
        if c == "Q":
            end = src.find("\\E", j)
            literal = src[j:] if end < 0 else src[j:end]
            return re.escape(literal), len(src) if end < 0 else end + 2
    if c < "\x80" and not c.isalnum():
        return "\\" + c, j
    raise UnsupportedRegexp(f"invalid escape sequence: \\{c}")


def _char_class(src: str, i: int) -> tuple[str, int]:
    """Translate the class starting at ``src[i] == '['``; return it and the next index."""
    out = ["["]
    j = i + 1
    if src.startswith("^", j):
        out.append("^")
        j += 1
    first = True
    while j < len(src):
        c = src[j]
        if c == "]" and not first:
            out.append("]")
            return "".join(out), j + 1
        first = False
        if src.startswith("[:", j):
            end = src.find(":]", j + 2)
            if end >= 0:
                name = src[j + 2 : end]
                negate = name.startswith("^")
                ranges = _ASCII_CLASSES.get(name[1:] if negate else name)
                if ranges is None:
                    raise UnsupportedRegexp(f"invalid character class range: [:{name}:]")
                out.append(_class_body(ranges, negate))
                j = end + 2
                continue
        if c == "\\":
            piece, j = _escape(src, j, in_class=True)
            out.append(piece)
            continue
        # Python reserves "[", "&&", "||", "~~" inside classes for future set syntax.
        out.append("\\" + c if c in "[&|~" else c)
        j += 1
    raise UnsupportedRegexp("missing closing ]")


def translate_go_regexp(src: str) -> str:
    """Rewrite a Go (RE2) regexp as a Python ``re`` pattern with the same meaning."""
    out: list[str] = []
    flags: frozenset[str] = frozenset()
    # (?flags) mid-group becomes a (?flags: ...) group that has to be closed (and reopened
    # after each |) before its enclosing group ends.
    opened: list[str] = []
    stack: list[tuple[frozenset[str], list[str]]] = []
    after_repeat = False
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        repeat = False
        if c == "\\":
            piece, i = _escape(src, i, in_class=False)
            out.append(piece)
        elif c == "[":
            piece, i = _char_class(src, i)
            out.append(piece)
        elif c == "(":
            if src.startswith("(?P<", i):
                end = src.find(">", i)
                name = src[i + 4 : end] if end > 0 else ""
                if not name or any(ch not in _FIELD_CHARS for ch in name):
                    raise UnsupportedRegexp(f"invalid named capture: {src[i:end + 1]}")
                # Names never matter to a match test, and Python's naming rules are stricter.
                stack.append((flags, opened))
                opened = []
                out.append("(")
                i = end + 1
            elif src.startswith("(?", i):
                m = _FLAG_GROUP.match(src, i)
                if m is None:
                    raise UnsupportedRegexp(f"invalid or unsupported Perl syntax: {src[i:i + 3]}")
                on, off, end = m.group(1), m.group(2), m.group(3)
                letters = on + (off or "")
                bad_letter = any(f not in "ims" for f in letters)
                if bad_letter or off == "" or (not letters and end == ")"):
                    raise UnsupportedRegexp(f"invalid or unsupported Perl syntax: {m.group()}")
                spec = f"(?{on}-{off}:" if off else f"(?{on}:"
                new_flags = (flags | frozenset(on)) - frozenset(off or "")
                if end == ":":
                    stack.append((flags, opened))
                    opened = []
                else:
                    opened.append(spec)
                flags = new_flags
                out.append(spec)
                i = m.end()
            else:
                stack.append((flags, opened))
                opened = []
                out.append("(")
                i += 1
        elif c == ")":
            if not stack:
                raise UnsupportedRegexp("unexpected )")
            out.append(")" * (len(opened) + 1))
            flags, opened = stack.pop()
            i += 1
        elif c == "|":
            out.append(")" * len(opened) + "|" + "".join(opened))
            i += 1
        elif c == "$":
            out.append("$" if "m" in flags else "\\Z")
            i += 1
        elif c in "*+?":
            if after_repeat:
                raise UnsupportedRegexp(f"invalid nested repetition operator: {c}")
            out.append(c)
            i += 1
            repeat = True
        elif c == "{":
            m = _REPEAT.match(src, i)
            if m is None:
                out.append("\\{")
                i += 1
            else:
                low = int(m.group(1))
                high = int(m.group(3)) if m.group(3) else (low if m.group(2) is None else -1)
                if low > _MAX_REPEAT or high > _MAX_REPEAT or (high >= 0 and low > high):
                    raise UnsupportedRegexp(f"invalid repeat count: {m.group()}")
                if after_repeat:
                    raise UnsupportedRegexp(f"invalid nested repetition operator: {m.group()}")
                out.append(m.group())
                i = m.end()
                repeat = True
        else:
            out.append(c)
            i += 1
        if repeat and src.startswith("?", i):  # non-greedy
            out.append("?")
            i += 1
        after_repeat = repeat
    if stack:
        raise UnsupportedRegexp("missing closing )")
    out.append(")" * len(opened))
    return "".join(out)


def compile_go_regexp(src: str) -> re.Pattern[str]:
    """Compile a Go regexp; raises ``UnsupportedRegexp`` or ``re.error`` if it cannot."""
    with warnings.catch_warnings():
        # Class syntax Python may one day read differently; the meaning today is Go's.
        warnings.simplefilter("ignore", FutureWarning)
        return re.compile(translate_go_regexp(src))
