"""Local content store: digest-addressed blobs and resumable, verified ingests."""

from berth.core.content.digest import Digest, parse
from berth.core.content.errors import OutOfRange
from berth.core.content.ingest import Status
from berth.core.content.store import BlobInfo, ContentStore, Reader
from berth.core.content.writer import Writer

__all__ = [
    "BlobInfo",
    "ContentStore",
    "Digest",
    "OutOfRange",
    "Reader",
    "Status",
    "Writer",
    "parse",
]
