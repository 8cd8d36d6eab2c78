"""Errors and quoting the content store uses (OutOfRange now lives in core.errdefs)."""

from __future__ import annotations

from core.errdefs import OutOfRange

__all__ = ["OutOfRange", "go_quote"]


def go_quote(text: str) -> str:
    """Go's %q for the common case, so messages read like containerd's."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
