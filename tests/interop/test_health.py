"""grpc.health.v1.Health on berthd answers exactly as on the real containerd.

dockerd's containerd client gates its event re-subscription on Check answering
SERVING, so the answers (status, error code and message) must be containerd's.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError

from berth.core.api.grpc.health.v1 import (
    HealthCheckRequest,
    HealthCheckResponse,
    HealthCheckResponseServingStatus as ServingStatus,
    HealthStub,
)
from tests.daemons import Daemon

pytestmark = [pytest.mark.interop]

SERVICES = ["", "containerd.services.tasks.v1.Tasks", "grpc.health.v1.Health", "no.such.Svc"]


async def _check(address: Path, service: str) -> tuple[str, str]:
    ch = Channel(path=str(address))
    try:
        resp = await HealthStub(ch).check(HealthCheckRequest(service=service), timeout=10)
        return ("ok", ServingStatus(resp.status).name)
    except GRPCError as e:
        return (Status(e.status).name, e.message or "")
    finally:
        ch.close()


async def _watch_first(address: Path, service: str) -> str:
    """The first message Watch sends; the stream must then stay open."""
    ch = Channel(path=str(address))
    try:
        async with ch.request(
            "/grpc.health.v1.Health/Watch", Cardinality.UNARY_STREAM, HealthCheckRequest,
            HealthCheckResponse, timeout=10,
        ) as stream:
            await stream.send_message(HealthCheckRequest(service=service), end=True)
            first = await stream.recv_message()
            assert first is not None
            # Nothing changes, so nothing more arrives, and the stream is not ended.
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(stream.recv_message(), 0.3)
            await stream.cancel()
            return ServingStatus(first.status).name
    finally:
        ch.close()


def _answers(d: Daemon) -> dict[str, object]:
    async def go() -> dict[str, object]:
        out: dict[str, object] = {}
        for s in SERVICES:
            out[f"check {s!r}"] = await _check(d.address, s)
            out[f"watch {s!r}"] = await _watch_first(d.address, s)
        return out

    return asyncio.run(go())


def test_health_same_as_containerd(berthd: Daemon, containerd: Daemon) -> None:
    ours, theirs = _answers(berthd), _answers(containerd)
    assert ours == theirs
    assert ours["check ''"] == ("ok", "SERVING")
    assert ours["watch ''"] == "SERVING"
