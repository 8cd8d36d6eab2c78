"""Registers the runtime v2 task manager as plugin io.containerd.runtime.v2.task."""

from __future__ import annotations

from pathlib import Path

from berth.core.metadata.containers import store_for
from berth.core.plugin import InitContext, Registration, hookimpl
from berth.core.plugin.graph import host_platform
from berth.core.plugin.registration import EVENT, METADATA, RUNTIME_V2
from berth.core.runtime.manager import TaskManager


async def _init(ctx: InitContext) -> TaskManager:
    cfg = ctx.daemon_config
    ctx.platforms.append(host_platform())
    level = str(cfg.data.get("debug", {}).get("level", "info")).lower()
    manager = TaskManager(
        root=Path(ctx.root), state=Path(ctx.state), address=str(cfg.address),
        ttrpc_address=str(cfg.ttrpc_address), events=ctx.plugins.get(EVENT),
        containers=store_for(ctx.plugins.get(METADATA).db), nursery=ctx.nursery,
        debug=level in ("debug", "trace"),
    )
    # Only noted here: reconnecting and cleaning up run once berthd serves (``serving``,
    # called by the daemon), so that dead shims never keep the API down.
    manager.adopt_existing()
    return manager


@hookimpl
def berth_plugins() -> list[Registration]:
    return [Registration(type=RUNTIME_V2, id="task", init=_init, requires=(EVENT, METADATA))]
