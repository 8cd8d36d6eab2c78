"""containerd's rule for identifiers (namespaces, containers, leases, snapshotter keys...).

An identifier is one or more ASCII alphanumeric runs joined by single ``.``, ``_`` or ``-``,
at most 76 bytes long, so it is always safe as one path component. The error messages are
containerd's, byte for byte, because clients print them.
"""

from __future__ import annotations

import re
import unicodedata

from berth.core.errdefs import InvalidArgument

__all__ = ["MAX_LENGTH", "PATTERN", "go_quote", "is_valid", "validate"]

MAX_LENGTH = 76
_ALNUM = "[A-Za-z0-9]+"
_BODY = f"{_ALNUM}(?:[._-](?:{_ALNUM}))*"
# The text containerd prints in its error (Go's Regexp.String of the anchored pattern).
PATTERN = f"^{_BODY}$"
# fullmatch rather than the anchors: Python's `$` also matches before a final newline.
_fullmatch = re.compile(_BODY).fullmatch


def is_valid(s: str) -> bool:
    return len(s) <= MAX_LENGTH and _fullmatch(s) is not None


def validate(s: str) -> None:
    """Raise ``InvalidArgument`` (with containerd's message) unless ``s`` is an identifier."""
    if is_valid(s):  # the common case; a match is ASCII, so characters are bytes
        return
    if not s:
        raise InvalidArgument("identifier must not be empty")
    if _go_len(s) > MAX_LENGTH:
        raise InvalidArgument(
            f"identifier {go_quote(s)} greater than maximum length ({MAX_LENGTH} characters)"
        )
    raise InvalidArgument(f"identifier {go_quote(s)} must match {PATTERN}")


def _go_len(s: str) -> int:
    """Length in UTF-8 bytes, as Go's len() counts a string."""
    try:
        return len(s.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        return len(s.encode("utf-8", "surrogatepass"))


_GO_ESCAPES = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
    '"': '\\"',
    "\\": "\\\\",
}


def _go_printable(ch: str) -> bool:
    # Go's unicode.IsPrint: letters, marks, numbers, punctuation, symbols, and ASCII space.
    if " " <= ch <= "~":
        return True
    return ch > "\x7f" and unicodedata.category(ch)[0] in "LMNPS"


def go_quote(s: str) -> str:
    """``s`` as Go's ``%q`` (strconv.Quote) prints it.

    Surrogate escapes (Python's stand-ins for bytes that were not UTF-8) print as the
    ``\\xNN`` byte Go would show.
    """
    out = ['"']
    for ch in s:
        escaped = _GO_ESCAPES.get(ch)
        if escaped is not None:
            out.append(escaped)
            continue
        if _go_printable(ch):
            out.append(ch)
            continue
        cp = ord(ch)
        if 0xDC80 <= cp <= 0xDCFF:
            out.append(f"\\x{cp - 0xDC00:02x}")
        elif 0xD800 <= cp <= 0xDFFF:
            out.extend(f"\\x{b:02x}" for b in ch.encode("utf-8", "surrogatepass"))
        elif cp < 0x20 or cp == 0x7F:
            out.append(f"\\x{cp:02x}")
        elif cp < 0x10000:
            out.append(f"\\u{cp:04x}")
        else:
            out.append(f"\\U{cp:08x}")
    out.append('"')
    return "".join(out)
