"""Local content store: digest-addressed blobs and resumable, verified ingests."""

from core.content.digest import Digest, parse
from core.content.errors import OutOfRange
from core.content.ingest import Status
from core.content.store import BlobInfo, ContentStore, Reader
from core.content.writer import Writer

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
