"""Unpacking an image into snapshots through the Snapshots and Diff services.

Layer by layer, as containerd's unpacker does it, so the snapshots get the same names
containerd gives them: the committed snapshot of layers 1..n is named by the chain ID
of their diff IDs, its parent is the chain ID of 1..n-1, and the work happens in an
active snapshot ``extract-<unique> <chainID>`` that is removed on failure. A layer
whose chain ID exists is skipped. Afterwards the layer blobs carry
``containerd.io/uncompressed`` and the config ``containerd.io/gc.ref.snapshot.<name>``,
which keeps the snapshots while the image is there.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Callable
from typing import Any

from berth.core import errdefs, log
from berth.core.images import mediatypes
from berth.core.images.image import Resolved
from berth.core.images.manifest import chain_id

_log = log.get("unpack")

PREPARE_TRIES = 3


def unique_part() -> str:
    """containerd's uniquePart: nanoseconds of the current second and 3 random bytes."""
    return f"{time.time_ns() % 1_000_000_000}-" \
           f"{base64.urlsafe_b64encode(secrets.token_bytes(3)).decode()}"


def extract_key(chain: str) -> str:
    return f"extract-{unique_part()} {chain}"


async def unpack(client: Any, image: Resolved, *,
                 on_layer: Callable[[int, str, bool], None] | None = None) -> str:
    """Unpack ``image`` with ``client``'s snapshotter; returns the top chain ID.

    ``on_layer(index, chain_id, applied)`` reports each layer (applied False: the
    snapshot was there already). Run it under a lease: snapshots in progress are
    only protected by one.
    """
    chain: list[str] = []
    for i, (layer, diff_id) in enumerate(image.layers):
        parent = chain_id(chain)
        chain.append(diff_id)
        cid = chain_id(chain)
        applied = await _layer(client, layer, diff_id, parent, cid)
        if applied:
            await client.update_labels(layer.digest, {mediatypes.LABEL_UNCOMPRESSED: diff_id})
        if on_layer is not None:
            on_layer(i, cid, applied)
    top = chain_id(chain)
    if top:
        await client.update_labels(image.manifest.config.digest, {
            f"{mediatypes.LABEL_GC_REF_SNAPSHOT}.{client.snapshotter}": top})
    return top


async def _layer(client: Any, layer: Any, diff_id: str, parent: str, cid: str) -> bool:
    if await client.stat(cid) is not None:
        return False
    # Imported here: core.snapshots loads the metadata package (trio) with it, which a
    # client that never unpacks need not pay for.
    from berth.core.snapshots import filter_inherited_labels

    labels = filter_inherited_labels(layer.annotations)
    labels[mediatypes.LABEL_SNAPSHOT_REF] = cid
    key = ""
    mounts = None
    for _ in range(PREPARE_TRIES):
        key = extract_key(cid)
        try:
            mounts = await client.prepare(key, parent, labels)
            break
        except errdefs.AlreadyExists:
            if await client.stat(cid) is not None:
                return False  # someone else unpacked it meanwhile
            continue  # a key collision: try another one
    if mounts is None:
        raise errdefs.Unavailable(f"unable to prepare extraction snapshot for {cid}")
    try:
        applied = await client.apply(layer, mounts)
        if applied.digest != diff_id:
            raise errdefs.FailedPrecondition(
                f"wrong diff id calculated on extraction {applied.digest!r}, "
                f"expected {diff_id}")
        try:
            await client.commit_snapshot(cid, key, labels)
        except errdefs.AlreadyExists:
            await _remove(client, key)
            return False
    except BaseException:
        await _remove(client, key)
        raise
    return True


async def _remove(client: Any, key: str) -> None:
    try:
        await client.remove_snapshot(key)
    except errdefs.BerthError as e:
        _log.warning("failed to clean up extraction snapshot", key=key, error=str(e))
