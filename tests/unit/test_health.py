"""The health service called directly: Check's answers and Watch's stream of changes."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from berth.core import errdefs
from berth.core.api.grpc.health.v1 import (
    HealthCheckRequest,
    HealthCheckResponse,
    HealthCheckResponseServingStatus as Status,
)
from berth.core.grpc.context import CallContext
from berth.core.services.health import HealthService


def test_check() -> None:
    h = HealthService()
    assert h.check(CallContext(), HealthCheckRequest()).status == Status.SERVING
    with pytest.raises(errdefs.NotFound, match="^unknown service$"):
        h.check(CallContext(), HealthCheckRequest(service="containerd.services.tasks.v1.Tasks"))


async def test_watch_sends_the_status_then_each_change() -> None:
    h = HealthService()
    got: dict[str, list[Status]] = {"": [], "x": []}

    async def watch(name: str) -> None:
        async def send(resp: HealthCheckResponse) -> None:
            got[name].append(resp.status)
        await h.watch(CallContext(), HealthCheckRequest(service=name), send)

    async with trio.open_nursery() as n:
        n.start_soon(watch, "")
        n.start_soon(watch, "x")
        await trio.testing.wait_all_tasks_blocked()
        assert got == {"": [Status.SERVING], "x": [Status.SERVICE_UNKNOWN]}
        h.set_status("x", Status.SERVING)
        h.set_status("", Status.SERVING)  # no change: nothing sent
        await trio.testing.wait_all_tasks_blocked()
        h.set_status("", Status.NOT_SERVING)
        await trio.testing.wait_all_tasks_blocked()
        assert got == {"": [Status.SERVING, Status.NOT_SERVING],
                       "x": [Status.SERVICE_UNKNOWN, Status.SERVING]}
        n.cancel_scope.cancel()
