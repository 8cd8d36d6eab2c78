"""The OCI layer format, shared by berthd's differ and the client library: layer
compression (:mod:`.compression`) and the layer tar between two directories (:mod:`.diff`).

Everything here is blocking and sans-concurrency: callers run it in a worker thread, under
trio (the differ plugin) or asyncio (the client library).
"""

WHITEOUT_PREFIX = ".wh."
# ``.wh..wh.`` names are metadata, not deletions (aufs left ``.wh..wh.plnk`` and friends).
WHITEOUT_META_PREFIX = WHITEOUT_PREFIX + WHITEOUT_PREFIX
OPAQUE_MARKER = WHITEOUT_META_PREFIX + ".opq"

__all__ = ["OPAQUE_MARKER", "WHITEOUT_META_PREFIX", "WHITEOUT_PREFIX"]
