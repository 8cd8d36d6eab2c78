"""containerd.services.introspection.v1.Introspection: the plugin graph and server id."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from berth.core import errdefs, filters
from berth.core.api.containerd.services.introspection.v1 import (
    IntrospectionBase,
    Plugin,
    PluginsRequest,
    PluginsResponse,
    ServerResponse,
)
from berth.core.api.containerd.types import Platform
from berth.core.api.google.rpc import Status
from berth.core.grpc.context import CallContext
from berth.core.plugin import InitContext, Registration, SkipPlugin, hookimpl
from berth.core.plugin.graph import PluginSet
from berth.core.plugin.registration import GRPC


def load_uuid(path: Path) -> str:
    """The server's UUID, created once and kept across restarts (write, fsync, rename)."""
    try:
        text = path.read_text().strip()
        return str(uuid.UUID(text))
    except FileNotFoundError:
        pass
    except ValueError as e:
        raise errdefs.Internal(f"corrupt server uuid in {path}: {e}", raw=True) from None
    value = str(uuid.uuid4())
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600),
              "w") as f:
        f.write(value)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    return value


def _init_err(p: object) -> Status | None:
    err = getattr(p, "error", None)
    if err is None:
        return None
    if isinstance(err, SkipPlugin):
        # ctr shows "skip" when the message carries containerd's ErrSkipPlugin text.
        return Status(code=2, message=f"{err}: skip plugin")
    code, message = errdefs.to_status(err)
    return Status(code=int(code), message=message)


class IntrospectionService:
    base = IntrospectionBase

    def __init__(self, plugins: PluginSet, server_uuid: str) -> None:
        self._plugins = plugins
        self.uuid = server_uuid

    def _describe(self) -> list[Plugin]:
        out = []
        for p in self._plugins.ordered:
            r = p.registration
            plugin = Plugin(
                type=r.type, id=r.id, requires=list(r.requires),
                platforms=[Platform(os=o, architecture=a, variant=v) for o, a, v in p.platforms],
                exports=dict(p.exports), capabilities=list(p.capabilities),
            )
            err = _init_err(p)
            if err is not None:  # unset, the field stays off the wire (as None did)
                plugin.init_err = err
            out.append(plugin)
        return out

    def plugins(self, ctx: CallContext, req: PluginsRequest) -> PluginsResponse:
        try:
            flt = filters.parse_all(list(req.filters))
        except errdefs.InvalidArgument as e:
            # containerd wraps the parse error in ErrInvalidArgument once more.
            raise errdefs.InvalidArgument(e.message) from None
        return PluginsResponse(plugins=[
            p for p in self._describe()
            if flt.match(filters.adapt_mapping({"type": p.type, "id": p.id}))
        ])

    def server(self, ctx: CallContext, req: object) -> ServerResponse:
        return ServerResponse(uuid=self.uuid)


async def _init(ctx: InitContext) -> IntrospectionService:
    # The plugin set is filled as init proceeds; this service reads it at call time.
    return IntrospectionService(ctx.plugins, load_uuid(ctx.root / "uuid"))


@hookimpl
def berth_plugins() -> list[Registration]:
    return [Registration(type=GRPC, id="introspection", init=_init, requires=("*",))]
