"""Content digests (``algorithm:hex``), validated the way go-digest does it.

A :class:`Digest` is a ``str`` so it travels through protobuf fields, dict keys and
log lines unchanged; constructing one through :func:`parse` is what guarantees the
string is well formed. Hex must be lowercase and of the algorithm's exact length,
because the hex part becomes a file name under ``blobs/<algorithm>/``.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from berth.core.errdefs import InvalidArgument

CANONICAL = "sha256"

# Hex length per supported algorithm (go-digest's set).
_HEX_LEN = {"sha256": 64, "sha384": 96, "sha512": 128}

# go-digest's grammar for any digest, used to tell "unsupported" from "malformed".
_ANY_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_LOWER_HEX = re.compile(r"[a-f0-9]+")

ERR_FORMAT = "invalid checksum digest format"
ERR_LENGTH = "invalid checksum digest length"
ERR_UNSUPPORTED = "unsupported digest algorithm"


class Digest(str):
    """A validated ``algorithm:hex`` string."""

    __slots__ = ()

    @property
    def algorithm(self) -> str:
        return self[: self.index(":")]

    @property
    def hex(self) -> str:  # str has no hex(); the name follows go-digest
        return self[self.index(":") + 1 :]

    @classmethod
    def from_hasher(cls, hasher: Any) -> Digest:
        return cls(f"{hasher.name}:{hasher.hexdigest()}")


def problem(value: str) -> str | None:
    """Why ``value`` is not a usable digest, or None when it is."""
    sep = value.find(":")
    if sep <= 0 or sep + 1 == len(value):
        return ERR_FORMAT
    algorithm, encoded = value[:sep], value[sep + 1 :]
    want = _HEX_LEN.get(algorithm)
    if want is None:
        return ERR_UNSUPPORTED if _ANY_DIGEST.fullmatch(value) else ERR_FORMAT
    if len(encoded) != want:
        return ERR_LENGTH
    if not _LOWER_HEX.fullmatch(encoded):
        return ERR_FORMAT
    return None


def parse(value: str) -> Digest:
    """Validate ``value``; raise InvalidArgument (``<value>: <reason>``) when it is bad."""
    if isinstance(value, Digest):
        return value
    if not isinstance(value, str):
        raise InvalidArgument(f"digest must be a string, not {type(value).__name__}")
    reason = problem(value)
    if reason is not None:
        raise InvalidArgument(f"{value}: {reason}")
    return Digest(value)


def is_supported(algorithm: str) -> bool:
    return algorithm in _HEX_LEN


def new_hasher(algorithm: str = CANONICAL) -> Any:
    """An incremental hashlib object for a supported algorithm."""
    if algorithm not in _HEX_LEN:
        raise InvalidArgument(f"{algorithm}: {ERR_UNSUPPORTED}")
    return hashlib.new(algorithm)


def from_bytes(data: bytes, algorithm: str = CANONICAL) -> Digest:
    """The digest of ``data``."""
    hasher = new_hasher(algorithm)
    hasher.update(data)
    return Digest.from_hasher(hasher)


def from_string(text: str, algorithm: str = CANONICAL) -> Digest:
    return from_bytes(text.encode(), algorithm)


# The name other modules (core.metadata.leases) import.
parse_digest = parse
