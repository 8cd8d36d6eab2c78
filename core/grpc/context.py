"""What a service method learns about the call it serves."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from berth.core import errdefs, identifiers

NAMESPACE_HEADER = "containerd-namespace"
LEASE_HEADER = "containerd-lease"


@dataclass
class CallContext:
    """Per-call metadata, independent of the transport (gRPC or ttrpc)."""

    metadata: Mapping[str, str | bytes] = field(default_factory=dict)
    namespace_key: str = NAMESPACE_HEADER
    deadline: float | None = None

    @property
    def namespace(self) -> str | None:
        value = self.metadata.get(self.namespace_key)
        if isinstance(value, bytes):
            value = value.decode()
        return value or None

    def namespace_required(self) -> str:
        """The call's namespace, validated, as containerd's NamespaceRequired."""
        ns = self.namespace
        if not ns:
            raise errdefs.FailedPrecondition("namespace is required")
        try:
            identifiers.validate(ns)
        except errdefs.BerthError as e:
            raise errdefs.InvalidArgument(f"namespace validation: {e}", raw=True) from None
        return ns

    @property
    def lease(self) -> str | None:
        value = self.metadata.get(LEASE_HEADER)
        if isinstance(value, bytes):
            value = value.decode()
        return value or None
