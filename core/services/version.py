"""containerd.services.version.v1.Version."""

from __future__ import annotations

from berth.core import __version__
from berth.core.api.containerd.services.version.v1 import VersionBase, VersionResponse
from berth.core.grpc.bridge import Encoded
from berth.core.grpc.context import CallContext
from berth.core.plugin import InitContext, Registration, hookimpl
from berth.core.plugin.registration import GRPC

REVISION = "berth"


class VersionService:
    base = VersionBase

    def __init__(self) -> None:
        # Serialized once: the answer never changes while the daemon runs.
        self._resp = Encoded(VersionResponse(version=__version__, revision=REVISION))

    def version(self, ctx: CallContext, req: object) -> Encoded:
        return self._resp


async def _init(ctx: InitContext) -> VersionService:
    return VersionService()


@hookimpl
def berth_plugins() -> list[Registration]:
    return [Registration(type=GRPC, id="version", init=_init)]
