"""containerd's rule for identifiers (namespaces, containers, leases, snapshotter keys...).

An identifier is one or more ASCII alphanumeric runs joined by single ``.``, ``_`` or ``-``,
at most 76 bytes long, so it is always safe as one path component. The error messages are
containerd's, byte for byte, because clients print them.
"""

from __future__ import annotations

import re

from berth.core.errdefs import InvalidArgument
from berth.core.gocompat.text import go_quote

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


def namespace_required(namespace: str | None) -> str:
    """A call's namespace, validated, as containerd's namespaces.NamespaceRequired."""
    if not namespace:
        from berth.core.errdefs import FailedPrecondition

        raise FailedPrecondition("namespace is required")
    try:
        validate(namespace)
    except InvalidArgument as e:
        raise InvalidArgument(f"namespace validation: {e}", raw=True) from None
    return namespace
