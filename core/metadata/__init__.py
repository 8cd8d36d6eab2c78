"""Metadata: one transactional sqlite store (WAL) for every namespaced object."""

from berth.core.metadata.db import Database

__all__ = ["Database"]
