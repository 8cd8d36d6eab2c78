"""Network ``none``: the namespace berth made, with only ``lo`` up."""

from __future__ import annotations

import trio

from berth.core import errdefs
from berth.core.networks import netns
from berth.core.networks.types import NetworkInfo, Result, SetupRequest
from berth.core.plugin import InitContext, Registration, hookimpl
from berth.core.plugin.registration import NETWORK


class NoneNetwork:
    def networks(self) -> list[NetworkInfo]:
        return [NetworkInfo(name="none", plugin="none")]

    async def setup(self, network: str, req: SetupRequest) -> Result:
        await trio.to_thread.run_sync(netns.loopback_up, req.netns)
        return Result()

    async def check(self, network: str, req: SetupRequest) -> None:
        links = await trio.to_thread.run_sync(netns.links, req.netns)
        if links != ["lo"]:
            raise errdefs.FailedPrecondition(
                f"namespace {req.netns} holds {links}, not only lo", raw=True)

    async def teardown(self, network: str, req: SetupRequest) -> None:
        return None  # the namespace goes with its pin


async def _init(ctx: InitContext) -> NoneNetwork:
    return NoneNetwork()


@hookimpl
def berth_plugins() -> list[Registration]:
    return [Registration(type=NETWORK, id="none", init=_init)]
