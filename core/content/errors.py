"""Errors the content store needs that core.errdefs does not define (yet).

containerd answers a write or read at the wrong offset with gRPC OutOfRange. The
class carries the code, so ``errdefs.to_status`` maps it correctly; it belongs in
``core.errdefs`` once that module grows an OutOfRange of its own.
"""

from __future__ import annotations

from core.errdefs import BerthError, Code


class OutOfRange(BerthError):
    code = Code.OUT_OF_RANGE
    suffix = "out of range"


def go_quote(text: str) -> str:
    """Go's %q for the common case, so messages read like containerd's."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
