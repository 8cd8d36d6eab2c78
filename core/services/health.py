"""grpc.health.v1.Health, as containerd's ``healthcheck`` plugin serves it.

dockerd's containerd client polls Check after it loses its event stream and only
subscribes again once the answer is SERVING, so without this service a restarted
berthd is never heard from again by a running dockerd.

containerd registers grpc-go's stock health server and never changes a status, so
the only known service is "" (the server as a whole), SERVING. A named service is
unknown: Check answers NotFound "unknown service", Watch sends SERVICE_UNKNOWN and
keeps the stream open. Both are kept here, so a client sees containerd's answers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from berth.core import errdefs
from berth.core.api.grpc.health.v1 import (
    HealthBase,
    HealthCheckRequest,
    HealthCheckResponse,
    HealthCheckResponseServingStatus as Status,
)
from berth.core.grpc.context import CallContext
from berth.core.plugin import InitContext, Registration, hookimpl
from berth.core.plugin.registration import GRPC


class HealthService:
    base = HealthBase

    def __init__(self) -> None:
        # Status(member): betterproto's enum members look like plain ints to mypy
        # (betterproto#616); the constructor gives back the same member, typed.
        self._status: dict[str, Status] = {"": Status(Status.SERVING)}
        self._changed = trio.Event()

    def set_status(self, service: str, status: Status) -> None:
        """Change a service's status; every Watch on it sends the new one."""
        self._status[service] = status
        self._changed.set()
        self._changed = trio.Event()

    def check(self, ctx: CallContext, req: HealthCheckRequest) -> HealthCheckResponse:
        status = self._status.get(req.service)
        if status is None:
            raise errdefs.NotFound("unknown service", raw=True)
        return HealthCheckResponse(status=status)

    async def watch(self, ctx: CallContext, req: HealthCheckRequest,
                    send: Callable[[HealthCheckResponse], Awaitable[None]]) -> None:
        # Sends the current status, then each change, until the client goes away (the
        # server cancels this task then).
        last: Status | None = None
        while True:
            changed = self._changed
            status = self._status.get(req.service, Status(Status.SERVICE_UNKNOWN))
            if status != last:
                await send(HealthCheckResponse(status=status))
                last = status
            await changed.wait()


async def _init(ctx: InitContext) -> HealthService:
    return HealthService()


@hookimpl
def berth_plugins() -> list[Registration]:
    return [Registration(type=GRPC, id="healthcheck", init=_init)]
