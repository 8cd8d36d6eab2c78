"""The lexer: containerd's filter scanner, and Go string unquoting for quoted tokens.

The scanner follows containerd's state machine closely, including its quirks, because clients
see its outcomes and its error messages verbatim. Positions count characters where containerd
counts bytes; the two only differ for non-ASCII input.
"""

from __future__ import annotations

import unicodedata

# Token kinds share one space with the characters the scanner returns (which are
# one-character strings), as in containerd's scanner: anything else it meets is returned
# as that character itself.
EOF = -1
QUOTED = -2
VALUE = -3
FIELD = -4
SEPARATOR = -5
OPERATOR = -6
ILLEGAL = -7

Rune = str | int

# Go's unicode.IsSpace.
_SPACES = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
    + "".join(chr(c) for c in range(0x2000, 0x200B))
)
FIELD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_QUOTES = frozenset('/|"')
OPERATOR_CHARS = frozenset("=!~")
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


class Scanner:
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
            return EOF
        self.pos = self.ppos
        ch = self.text[self.ppos]
        self.ppos += 1
        # Surrogates are how Python carries bytes that were not UTF-8; containerd also
        # refuses a literal U+FFFD since it cannot tell it from a decoding error.
        if ch == "\ufffd" or "\ud800" <= ch <= "\udfff":
            self.error("rune error")
            return ILLEGAL
        if ch == "\x00":
            self.error("unexpected null")
            return ILLEGAL
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
                kind = QUOTED if self._scan_quoted(ch) else ILLEGAL
                return pos, kind, self.text[pos : self.ppos]
            if ch == "," or ch == ".":
                self.value = False
                return pos, SEPARATOR, ch
            if ch in OPERATOR_CHARS:
                while self.peek() in OPERATOR_CHARS:
                    self.next()
                self.value = True
                return pos, OPERATOR, self.text[pos : self.ppos]
            if ch in _SPACES:
                ch = self.next()
                pos = self.pos
                continue
            if self.value:
                while _is_value_char(self.peek()):
                    self.next()
                self.value = False
                return pos, VALUE, self.text[pos : self.ppos]
            if ch in FIELD_CHARS:
                while self.peek() in FIELD_CHARS:
                    self.next()
                return pos, FIELD, self.text[pos : self.ppos]
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


class QuoteSyntaxError(ValueError):
    def __str__(self) -> str:
        return "quote syntax error"


def unquote(token: str) -> str:
    """Decode a quoted token (Go string syntax, with ``/`` and ``|`` as extra quotes).

    ``\\x`` and octal escapes produce raw bytes, as in Go; bytes that do not form UTF-8
    come back as surrogate escapes.
    """
    quote = token[0]
    if len(token) < 2 or token[-1] != quote or quote not in "\"'/|":
        raise QuoteSyntaxError
    body = token[1:-1]
    if "\n" in body:
        raise QuoteSyntaxError
    if "\\" not in body and quote not in body:
        return body
    out = bytearray()
    i, n = 0, len(body)
    while i < n:
        c = body[i]
        if c == quote:
            raise QuoteSyntaxError
        if c != "\\":
            out += c.encode()
            i += 1
            continue
        if i + 1 >= n:
            raise QuoteSyntaxError
        e = body[i + 1]
        i += 2
        simple = _SIMPLE_ESCAPES.get(e)
        if simple is not None:
            out.append(simple)
        elif e in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[e]
            digits = body[i : i + width]
            if len(digits) < width or any(d not in _HEX for d in digits):
                raise QuoteSyntaxError
            i += width
            v = int(digits, 16)
            if e == "x":
                out.append(v)
            elif v > 0x10FFFF:
                raise QuoteSyntaxError
            else:
                # Go encodes a surrogate code point as the replacement character.
                out += ("\ufffd" if 0xD800 <= v <= 0xDFFF else chr(v)).encode()
        elif e in "01234567":
            digits = body[i - 1 : i + 2]
            if len(digits) < 3 or any(d not in "01234567" for d in digits):
                raise QuoteSyntaxError
            i += 2
            v = int(digits, 8)
            if v > 255:
                raise QuoteSyntaxError
            out.append(v)
        elif e in "'\"|/" and e == quote:
            out.append(ord(e))
        else:
            raise QuoteSyntaxError
    return out.decode("utf-8", "surrogateescape")


_SIMPLE_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92}
