"""Snapshots: the snapshotter interface, its data types and label rules."""

from berth.core.mount import Mount
from berth.core.snapshots.snapshotter import (
    INHERITED_LABEL_PREFIX,
    LABEL_SNAPSHOT_REF,
    Info,
    Kind,
    Snapshotter,
    Usage,
    adapt_info,
    filter_inherited_labels,
    validate_labels,
)

__all__ = [
    "INHERITED_LABEL_PREFIX",
    "LABEL_SNAPSHOT_REF",
    "Info",
    "Kind",
    "Mount",
    "Snapshotter",
    "Usage",
    "adapt_info",
    "filter_inherited_labels",
    "validate_labels",
]
