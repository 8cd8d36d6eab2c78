"""What a differ is: containerd's diff.Applier and diff.Comparer, as a typing.Protocol.

A differ (plugin type ``io.containerd.differ.v1``) applies a layer blob from the content
store onto mounts, and writes the layer between two sets of mounts into the content store.
The diff service (``berth.core.services.diff``) finds the differs through their plugin
registrations and talks to them only through this protocol; mounts are
:class:`berth.core.mount.Mount`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from berth.core.mount import Mount

__all__ = ["Applied", "Differ", "Mount"]


@dataclass(frozen=True)
class Applied:
    """A descriptor of what Apply or Compare produced (media type, digest, size)."""

    media_type: str
    digest: str
    size: int


@runtime_checkable
class Differ(Protocol):
    """A differ. NotImplemented (``berth.core.errdefs.NotImplemented_``) means "try the next"."""

    async def apply(self, namespace: str, media_type: str, digest: str, size: int,
                    mounts: Sequence[Mount]) -> Applied: ...

    async def compare(self, namespace: str, lower: Sequence[Mount], upper: Sequence[Mount],
                      *, media_type: str = "", ref: str = "",
                      labels: dict[str, str] | None = None, lease: str | None = None
                      ) -> Applied: ...
