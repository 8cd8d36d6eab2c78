"""Errors and quoting the content store uses (OutOfRange now lives in core.errdefs)."""

from __future__ import annotations

from berth.core.errdefs import OutOfRange
from berth.core.identifiers import go_quote

__all__ = ["OutOfRange", "go_quote"]
