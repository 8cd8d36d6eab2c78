"""JSON bytes exactly as Go's encoding/json writes them.

Manifests and indexes that berth writes (docker-archive imports, exports) are content:
their digest is the sha256 of the bytes. To get the digests containerd gets for the
same input, the bytes must match Go's ``json.Marshal``: no spaces, struct fields in
declaration order (callers build dicts in that order), map keys sorted, non-ASCII
kept as UTF-8, ``<``, ``>``, ``&``, U+2028 and U+2029 escaped, control characters
other than ``\\n``, ``\\r`` and ``\\t`` as ``\\u00XX``.
"""

from __future__ import annotations

import json
import re
from typing import Any

_PY_SHORT_ESCAPES = re.compile(r'\\[bf]|[<>&\u2028\u2029]')
_REPLACE = {"\\b": "\\u0008", "\\f": "\\u000c", "<": "\\u003c", ">": "\\u003e",
            "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def _sorted_maps(value: Any, sort: bool) -> Any:
    if isinstance(value, Map):
        return {k: _sorted_maps(value[k], True) for k in sorted(value)}
    if isinstance(value, dict):
        keys = sorted(value) if sort else list(value)
        return {k: _sorted_maps(value[k], False) for k in keys}
    if isinstance(value, (list, tuple)):
        return [_sorted_maps(v, False) for v in value]
    return value


class Map(dict):
    """A Go map (keys sorted on output); a plain dict stands for a struct."""


def marshal(value: Any) -> bytes:
    """Go's json.Marshal of ``value``; wrap maps in :class:`Map` to have keys sorted."""
    text = json.dumps(_sorted_maps(value, False), separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)
    # Python's "\\\\b" would come out as an escaped backslash then "b": only replace
    # escapes that are not themselves escaped.
    text = _PY_SHORT_ESCAPES.sub(lambda m: _escape(m, text), text)
    return text.encode("utf-8", "surrogatepass")


def _escape(m: re.Match[str], text: str) -> str:
    token = m.group(0)
    if token.startswith("\\"):
        backslashes = 0
        i = m.start() - 1
        while i >= 0 and text[i] == "\\":
            backslashes += 1
            i -= 1
        if backslashes % 2:
            return token  # "\\\\" + "b": a literal backslash followed by "b"
    return _REPLACE[token]
