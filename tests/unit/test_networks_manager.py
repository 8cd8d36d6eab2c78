"""The network manager's records and recovery, with a plugin of the test's own (no root:
its network needs no namespace)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from berth.core import errdefs
from berth.core.metadata.db import Database
from berth.core.metadata.networks import ATTACHED, ATTACHING, Attachment, AttachmentStore
from berth.core.networks.manager import NetworkManager
from berth.core.networks.types import (
    IPConfig,
    NetworkInfo,
    NetworkPlugin,
    PortMapping,
    Result,
    SetupRequest,
)


class FakeNet:
    """Counts what it was asked; fails on demand."""

    def __init__(self) -> None:
        self.up: set[tuple[str, str]] = set()
        self.fail_setup = ""
        self.fail_teardown = ""
        self.gate: trio.Event | None = None

    def networks(self) -> list[NetworkInfo]:
        return [NetworkInfo(name=n, plugin="fake", needs_netns=False, port_mappings=True)
                for n in ("n1", "n2")]

    async def setup(self, network: str, req: SetupRequest) -> Result:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_setup == network:
            raise errdefs.Unknown(f"{network} refuses", raw=True)
        self.up.add((req.id, network))
        return Result(ips=[IPConfig(address="10.9.0.2/24")])

    async def check(self, network: str, req: SetupRequest) -> None:
        return None

    async def teardown(self, network: str, req: SetupRequest) -> None:
        if self.fail_teardown == network:
            raise errdefs.Unknown("teardown failed", raw=True)
        self.up.discard((req.id, network))


def make(tmp_path: Path, plugin: FakeNet, **kw: Any
         ) -> tuple[NetworkManager, list[tuple[str, str, Any]]]:
    events: list[tuple[str, str, Any]] = []
    store = AttachmentStore(Database(tmp_path / "meta.db"))
    m = NetworkManager(plugins=lambda: {"fake": plugin}, store=store, state=tmp_path,
                       publish=lambda ns, topic, msg: events.append((ns, topic, msg)), **kw)
    return m, events


def test_fake_is_a_network_plugin() -> None:
    assert isinstance(FakeNet(), NetworkPlugin)


async def test_attach_detach_records_and_events(tmp_path: Path) -> None:
    fake = FakeNet()
    m, events = make(tmp_path, fake)
    a = await m.attach("ns", "c1", "n1", ports=[PortMapping(18999, 80, host_ip="127.0.0.1")],
                       container=True)
    assert (a.state, a.result.addresses() if a.result else None) == (ATTACHED, ["10.9.0.2/24"])
    assert fake.up == {("c1", "n1")}
    [rec] = m.store.list("ns")
    assert (rec.state, rec.port_mappings[0].host_port, rec.ifname) == (ATTACHED, 18999, "eth0")
    b = await m.attach("ns", "c1", "n2")
    assert b.ifname == "eth1"
    with pytest.raises(errdefs.AlreadyExists, match="already allocated"):
        await m.attach("ns", "c2", "n1", ports=[PortMapping(18999, 81, host_ip="127.0.0.1")])
    with pytest.raises(errdefs.AlreadyExists):
        await m.attach("ns", "c1", "n1")
    with pytest.raises(errdefs.NotFound, match="nope"):
        await m.attach("ns", "c1", "nope")
    assert await m.detach("ns", "c1") == 2
    assert fake.up == set() and m.store.list() == []
    assert [t for _, t, _ in events] == ["/networks/attach", "/networks/attach",
                                         "/networks/detach", "/networks/detach"]


async def test_failed_setup_leaves_no_record(tmp_path: Path) -> None:
    fake = FakeNet()
    fake.fail_setup = "n2"
    m, events = make(tmp_path, fake)
    with pytest.raises(errdefs.Unknown, match="n2 refuses"):
        await m.prepare_container("ns", "c1", {"io.berth.network": "n1,n2"})
    assert fake.up == set() and m.store.list() == [] and events == []


async def test_record_is_written_before_setup_and_kept_when_teardown_fails(
        tmp_path: Path) -> None:
    fake = FakeNet()
    fake.gate = trio.Event()
    m, _ = make(tmp_path, fake)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(m.attach, "ns", "c1", "n1")
        await trio.testing.wait_all_tasks_blocked()
        # berthd dying here would leave this record for the next one.
        assert [a.state for a in m.store.list()] == [ATTACHING]
        fake.gate.set()
    fake.fail_teardown = "n1"
    with pytest.raises(errdefs.Unknown):
        await m.detach("ns", "c1")
    assert [a.network for a in m.store.list()] == ["n1"]  # kept, to retry


async def test_recover_tears_down_half_made_and_taskless(tmp_path: Path) -> None:
    fake = FakeNet()
    tasks = {("ns", "live")}
    m, _ = make(tmp_path, fake, has_task=lambda ns, id: (ns, id) in tasks)
    m.store.add(Attachment(namespace="ns", id="half", network="n1", plugin="fake",
                           netns="", state=ATTACHING))
    for cid in ("live", "gone"):
        await m.attach("ns", cid, "n1", container=True)
    await m.attach("ns", "raw", "n2")  # not a container's: kept
    assert await m.recover() == 2
    assert sorted(a.id for a in m.store.list()) == ["live", "raw"]


async def test_collect_stale(tmp_path: Path) -> None:
    fake = FakeNet()
    exists = {("ns", "kept")}
    m, _ = make(tmp_path, fake, container_exists=lambda ns, id: (ns, id) in exists)
    from betterproto.lib.google.protobuf import Any as AnyMsg

    from berth.core.metadata.containers import Container, ContainerStore

    spec = AnyMsg(type_url="types.containerd.io/opencontainers/runtime-spec/1/Spec",
                  value=b"{}")
    ContainerStore(m.store.db).create("ns", Container(
        id="kept", runtime_name="io.containerd.runc.v2", spec=spec))
    for cid in ("kept", "deleted"):
        await m.attach("ns", cid, "n1", container=True)
    assert await m.collect_stale() == 1
    assert [a.id for a in m.store.list()] == ["kept"]


async def test_labels_errors(tmp_path: Path) -> None:
    m, _ = make(tmp_path, FakeNet())
    assert await m.prepare_container("ns", "c", {}) is None
    # The hostname (found by parsing the spec) is asked for only when it is needed.
    assert await m.prepare_container(
        "ns", "c", {}, hostname=lambda: pytest.fail("hostname asked for")) is None
    with pytest.raises(errdefs.InvalidArgument, match="needs io.berth.network"):
        await m.prepare_container("ns", "c", {"io.berth.ports": "1:2"})
    with pytest.raises(errdefs.InvalidArgument, match="1-65535"):
        await m.prepare_container("ns", "c", {"io.berth.network": "n1",
                                              "io.berth.ports": "0:80"})
    assert m.store.list() == []
