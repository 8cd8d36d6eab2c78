"""Request metadata names berth shares with containerd's clients and shims.

The namespace of a call travels in the ``containerd-namespace`` gRPC header, and in the
``containerd-namespace-ttrpc`` metadata key on ttrpc (containerd's namespaces package).
Server, client library and shim all take the names from here.
"""

from __future__ import annotations

GRPC_NAMESPACE = "containerd-namespace"
TTRPC_NAMESPACE = "containerd-namespace-ttrpc"
# The lease a call works under (containerd's leases package).
GRPC_LEASE = "containerd-lease"
