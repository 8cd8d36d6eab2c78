"""Go's text: ``%q`` quoting and the wording of OS errors, as containerd prints them."""

from __future__ import annotations

import os
import unicodedata

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


def go_error(op: str, path: os.PathLike[str] | str, exc: OSError) -> str:
    """An OSError worded like Go's *PathError ("mkdir /x: file exists")."""
    reason = exc.strerror or str(exc)
    return f"{op} {os.fspath(path)}: {reason[:1].lower()}{reason[1:]}"


def go_errno(e: OSError) -> str:
    """Go's text for an errno (``no such file or directory``): libc's, lower-cased."""
    if e.errno is not None:
        return os.strerror(e.errno).lower()
    return (e.strerror or str(e)).lower()


def path_error(e: OSError, op: str = "open") -> str:
    """Go's ``*PathError`` text: ``open /x.tar: no such file or directory``."""
    return f"{op} {e.filename}: {go_errno(e)}"
