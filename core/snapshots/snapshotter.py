"""What a snapshotter is: containerd's snapshots.Snapshotter, as a typing.Protocol.

A snapshot is a directory tree identified by a key. An *active* snapshot is writable
and can be committed under a name, which turns it into a *committed* snapshot that
children are prepared from; a *view* is a read-only snapshot of a committed parent.
Snapshotter backends (``plugins/snapshotters``) know nothing of namespaces: the
namespaced layer in ``berth.core.metadata.snapshots`` maps namespaced keys onto backend keys.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

from berth.core import errdefs, filters
from berth.core.metadata.namespaces import validate_label
from berth.core.mount import Mount

# Labels a snapshotter backend sees (and keeps): everything else lives only in metadata.
INHERITED_LABEL_PREFIX = "containerd.io/snapshot/"
LABEL_SNAPSHOT_REF = "containerd.io/snapshot.ref"

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Kind(enum.IntEnum):
    """Same numbers as containerd's snapshots.Kind and the API's Kind enum."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    def __str__(self) -> str:
        return self.name.capitalize()

    @classmethod
    def parse(cls, text: str) -> Kind:
        try:
            return cls[text.upper()]
        except KeyError:
            return cls.UNKNOWN

    @property
    def filter_value(self) -> str:
        return "" if self is Kind.UNKNOWN else self.name.lower()


@dataclass
class Info:
    name: str
    parent: str = ""
    kind: Kind = Kind.UNKNOWN
    labels: dict[str, str] = field(default_factory=dict)
    created: datetime = _EPOCH
    updated: datetime = _EPOCH


@dataclass
class Usage:
    inodes: int = 0
    size: int = 0

    def add(self, other: Usage) -> None:
        self.inodes += other.inodes
        self.size += other.size


def filter_inherited_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    """The labels a backend is given: the snapshot ref and ``containerd.io/snapshot/*``."""
    return {
        k: v for k, v in (labels or {}).items()
        if k == LABEL_SNAPSHOT_REF or k.startswith(INHERITED_LABEL_PREFIX)
    }


def validate_labels(labels: Mapping[str, str] | None) -> None:
    for k, v in (labels or {}).items():
        try:
            validate_label(k, v)
        except errdefs.InvalidArgument as e:
            raise errdefs.InvalidArgument(f"info.Labels: {e.message}", raw=True) from None


def adapt_info(info: Info) -> filters.Adaptor:
    """containerd's adaptSnapshot: name, parent (present even when empty), kind, labels."""

    def field_(path: tuple[str, ...]) -> tuple[str, bool]:
        if not path:
            return "", False
        head = path[0]
        if head == "kind":
            value = info.kind.filter_value
            return value, bool(value)
        if head == "name":
            return info.name, True
        if head == "parent":
            return info.parent, True
        if head == "labels":
            if not info.labels:
                return "", False
            key = ".".join(path[1:])
            if key in info.labels:
                return info.labels[key], True
        return "", False

    return field_


@runtime_checkable
class Snapshotter(Protocol):
    """A snapshotter backend. Errors are ``berth.core.errdefs`` types worded like containerd's."""

    async def stat(self, key: str) -> Info: ...

    async def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info: ...

    async def usage(self, key: str) -> Usage: ...

    async def mounts(self, key: str) -> list[Mount]: ...

    async def prepare(self, key: str, parent: str = "",
                      labels: Mapping[str, str] | None = None) -> list[Mount]: ...

    async def view(self, key: str, parent: str = "",
                   labels: Mapping[str, str] | None = None) -> list[Mount]: ...

    async def commit(self, name: str, key: str,
                     labels: Mapping[str, str] | None = None) -> None: ...

    async def remove(self, key: str) -> None: ...

    async def walk(self, filter_exprs: Sequence[str] = ()) -> list[Info]: ...

    async def cleanup(self) -> None: ...

    def close(self) -> None: ...
