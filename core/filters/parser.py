"""The parser: expressions to filters, with containerd's error messages.

containerd's quirks are kept (trailing spaces after a value are an error; an invalid regexp is
not a parse error but never matches), because clients see these outcomes verbatim.
"""

from __future__ import annotations

from collections.abc import Sequence

from berth.core.errdefs import InvalidArgument
from berth.core.filters.filter import ALWAYS, SELECTORS, AllOf, AnyOf, Filter, Present, Selector
from berth.core.filters.scanner import (
    EOF,
    FIELD,
    ILLEGAL,
    OPERATOR,
    QUOTED,
    VALUE,
    QuoteSyntaxError,
    Scanner,
    unquote,
)


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


class _Parser:
    __slots__ = ("text", "scanner")

    def __init__(self, text: str) -> None:
        self.text = text
        self.scanner = Scanner(text)

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
            if ch == EOF:
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
        if ch == "," or ch == EOF:
            return Present(fieldpath)
        op = self.operator()
        value = self.value(allow_alt_quotes=op == "~=")
        return SELECTORS[op](fieldpath, value)

    def fieldpath(self) -> tuple[str, ...]:
        fields = [self.field()]
        while self.scanner.peek() == ".":
            self.scanner.scan()
            fields.append(self.field())
        return tuple(fields)

    def field(self) -> str:
        return self.word((FIELD,), allow_alts=False, expected="expected field or quoted")

    def operator(self) -> str:
        pos, tok, text = self.scanner.scan()
        if tok == OPERATOR:
            if text in SELECTORS:
                return text
            # Operators hold only "=!~", so Go's %q is plain double quoting here.
            raise self.error(pos, f'unsupported operator "{text}"')
        if tok == ILLEGAL:
            raise self.error(pos, self.scanner.err)
        raise self.error(pos, 'expected an operator ("=="|"!="|"~=")')

    def value(self, *, allow_alt_quotes: bool) -> str:
        return self.word((VALUE, FIELD), allow_alts=allow_alt_quotes,
                         expected="expected value or quoted")

    def word(self, bare: tuple[int, ...], *, allow_alts: bool, expected: str) -> str:
        """A bare token of one of the kinds in ``bare``, or a quoted one, unquoted."""
        pos, tok, text = self.scanner.scan()
        if tok in bare:
            return text
        if tok == QUOTED:
            return self.quoted(pos, text, allow_alts=allow_alts)
        if tok == ILLEGAL:
            raise self.error(pos, self.scanner.err)
        raise self.error(pos, expected)

    def quoted(self, pos: int, text: str, *, allow_alts: bool) -> str:
        if not allow_alts and text[0] not in "'\"":
            raise self.error(pos, "invalid quote encountered")
        try:
            return unquote(text)
        except QuoteSyntaxError as exc:
            raise self.error(pos, f"unquoting failed: {exc}") from None
