"""Registers the network manager as plugin io.containerd.internal.v1.berth.networks.

It needs every network plugin (type io.berth.network.v1) and the runtime's task list (to
tell, after a restart, which containers still have a task to keep their networks for).
"""

from __future__ import annotations

from typing import Any

from berth.core import errdefs, log
from berth.core.events import typeurl
from berth.core.events.exchange import Event, Exchange
from berth.core.networks.manager import NetworkManager
from berth.core.plugin import InitContext, Registration, hookimpl
from berth.core.plugin.registration import (
    EVENT,
    GC,
    INTERNAL,
    METADATA,
    NETWORK,
    RUNTIME_V2,
)

ID = "berth.networks"
_GONE_TOPICS = ("/tasks/delete", "/containers/delete")

_log = log.get("networks")


def _listener(manager: NetworkManager) -> Any:
    def on_event(ev: Event) -> None:
        if ev.topic not in _GONE_TOPICS or not ev.has_event:
            return
        # Runs inside every publisher's call: nothing may escape into it.
        try:
            msg = typeurl.unmarshal(ev.type_url, ev.value)
            cid = getattr(msg, "container_id", "") or getattr(msg, "id", "")
            if cid and manager.store_has(ev.namespace, cid):
                manager.task_gone(ev.namespace, cid)
        except Exception as e:
            _log.error("network detach after event", topic=ev.topic,
                       namespace=ev.namespace, error=str(e))
    return on_event


async def _init(ctx: InitContext) -> NetworkManager:
    md = ctx.plugins.get(METADATA)
    events: Exchange = ctx.plugins.get(EVENT)
    runtime = ctx.plugins.get(RUNTIME_V2, "task")
    containers = md.containers
    plugins = ctx.plugins

    def container_exists(ns: str, id: str) -> bool:
        try:
            containers.get(ns, id)
        except errdefs.NotFound:
            return False
        return True

    def publish(ns: str, topic: str, msg: Any) -> None:
        try:
            events.publish(ns, topic, msg)
        except errdefs.BerthError as e:
            _log.error("failed to publish event", topic=topic, namespace=ns, error=str(e))

    manager = NetworkManager(
        plugins=lambda: plugins.by_type(NETWORK), store=md.attachments,
        state=ctx.state, publish=publish,
        has_task=lambda ns, id: runtime.get(ns, id) is not None,
        container_exists=container_exists)
    events.listeners.append(_listener(manager))
    try:
        ctx.plugins.get(GC, "scheduler").collector.add_cleaner("networks",
                                                              manager.collect_stale)
    except errdefs.NotFound:
        _log.info("no gc scheduler: stale attachments are torn down at container delete")
    await ctx.nursery.start(manager.run)
    ctx.exports["state"] = str(ctx.state)
    return manager


@hookimpl
def berth_plugins() -> list[Registration]:
    return [Registration(type=INTERNAL, id=ID, init=_init,
                         requires=(METADATA, EVENT, RUNTIME_V2, NETWORK))]
