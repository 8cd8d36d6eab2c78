"""Network ``host``: the host's own namespace; nothing to set up or tear down."""

from __future__ import annotations

from berth.core.networks.types import NetworkInfo, Result, SetupRequest
from berth.core.plugin import InitContext, Registration, hookimpl
from berth.core.plugin.registration import NETWORK


class HostNetwork:
    def networks(self) -> list[NetworkInfo]:
        return [NetworkInfo(name="host", plugin="host", needs_netns=False)]

    async def setup(self, network: str, req: SetupRequest) -> Result:
        return Result()

    async def check(self, network: str, req: SetupRequest) -> None:
        return None

    async def teardown(self, network: str, req: SetupRequest) -> None:
        return None


async def _init(ctx: InitContext) -> HostNetwork:
    return HostNetwork()


@hookimpl
def berth_plugins() -> list[Registration]:
    return [Registration(type=NETWORK, id="host", init=_init)]
