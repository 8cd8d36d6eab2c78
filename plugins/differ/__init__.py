"""The differ: applies OCI layers onto snapshot directories, and makes them.

``apply_layer`` takes an uncompressed tar stream; ``apply_blob`` takes a layer blob
as stored (gzip, zstd or plain, recognised by its first bytes) and its media type.
``write_diff`` writes the layer tar between two directories. All block: call them
from a worker thread, one hop per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from berth.core.archive import compression
from berth.core.archive.diff import write_diff
from berth.plugins.differ.apply import ApplyResult, Mode, apply_layer

__all__ = [
    "ApplyResult",
    "ApplyTarget",
    "Mode",
    "apply_blob",
    "apply_layer",
    "compression",
    "target_for_mounts",
    "write_diff",
]


@dataclass(frozen=True, slots=True)
class ApplyTarget:
    """Where and how to apply a layer for a snapshot's mounts."""

    path: str
    mode: Mode
    parents: tuple[str, ...] = ()


def target_for_mounts(mounts: Sequence[tuple[str, str, Sequence[str]]]) -> ApplyTarget | None:
    """Pick the directory to unpack into from a snapshot's mounts (type, source, options).

    As containerd's applier: one overlay mount means its ``upperdir`` in overlay
    mode, with the ``lowerdir`` entries as parents; one bind mount means its source
    in native mode. Anything else (None) has to be mounted on a temporary directory
    by the caller and applied there in native mode.
    """
    if len(mounts) != 1:
        return None
    kind, source, options = mounts[0]
    if kind == "overlay":
        upper = ""
        lowers: tuple[str, ...] = ()
        for option in options:
            if option.startswith("upperdir="):
                upper = option[len("upperdir="):]
            elif option.startswith("lowerdir="):
                lowers = tuple(option[len("lowerdir="):].split(":"))
        return ApplyTarget(upper, "overlay", lowers) if upper else None
    if kind == "bind" or {"bind", "rbind"} & set(options):
        return ApplyTarget(source, "native")
    return None


def apply_blob(
    blob: compression.ByteSource,
    target: Path | str,
    *,
    media_type: str | None = None,
    mode: Mode = "overlay",
    parents: Sequence[Path | str] = (),
) -> ApplyResult:
    """Decompress and apply a layer blob; the result's ``diff_id`` and ``size`` are
    of the uncompressed tar (what an image config's ``rootfs.diff_ids`` lists).

    A media type that is not a layer's is refused with NotImplemented_; otherwise
    the bytes decide the compression, as containerd's decompressor does.
    """
    if media_type is not None:
        compression.from_media_type(media_type)
    reader = compression.open_stream(blob)
    try:
        return apply_layer(reader, target, mode=mode, parents=parents)
    finally:
        reader.close()
