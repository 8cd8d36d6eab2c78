"""What a service method learns about the call it serves."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from berth.core import identifiers
from berth.core.headers import GRPC_LEASE, GRPC_NAMESPACE


@dataclass
class CallContext:
    """Per-call metadata, independent of the transport (gRPC or ttrpc)."""

    metadata: Mapping[str, str | bytes] = field(default_factory=dict)
    namespace_key: str = GRPC_NAMESPACE
    deadline: float | None = None

    @property
    def namespace(self) -> str | None:
        value = self.metadata.get(self.namespace_key)
        if isinstance(value, bytes):
            value = value.decode()
        return value or None

    def namespace_required(self) -> str:
        """The call's namespace, validated, as containerd's NamespaceRequired."""
        return identifiers.namespace_required(self.namespace)

    @property
    def lease(self) -> str | None:
        value = self.metadata.get(GRPC_LEASE)
        if isinstance(value, bytes):
            value = value.decode()
        return value or None
