"""A third-party network plugin: a veth pair inside the namespace, one end addressed.

It knows berth only through the plugin hook, the registration and the network types.
"""

from __future__ import annotations

import trio
from pyroute2 import IPRoute

from berth.core.networks import netns
from berth.core.networks.types import Interface, IPConfig, NetworkInfo, Result, SetupRequest
from berth.core.plugin import Registration, hookimpl
from berth.core.plugin.registration import NETWORK

ADDRESS = "192.0.2.10"
LINK = "tn0"


def _add_link() -> None:
    with IPRoute() as ipr:
        ipr.link("add", ifname=LINK, kind="veth", peer="tn1")
        idx = ipr.link_lookup(ifname=LINK)[0]
        ipr.addr("add", index=idx, address=ADDRESS, prefixlen=24)
        ipr.link("set", index=idx, state="up")


class TestNet:
    def networks(self) -> list[NetworkInfo]:
        return [NetworkInfo(name="testnet", plugin="testnet", config="dummy tn0")]

    async def setup(self, network: str, req: SetupRequest) -> Result:
        await trio.to_thread.run_sync(netns.run_in, req.netns, _add_link)
        return Result(interfaces=[Interface(name=LINK, sandbox=req.netns)],
                      ips=[IPConfig(address=f"{ADDRESS}/24", interface=0)])

    async def check(self, network: str, req: SetupRequest) -> None:
        return None

    async def teardown(self, network: str, req: SetupRequest) -> None:
        return None  # the link goes with the namespace


async def _init(ctx: object) -> TestNet:
    return TestNet()


@hookimpl
def berth_plugins() -> list[Registration]:
    return [Registration(type=NETWORK, id="testnet", init=_init)]
