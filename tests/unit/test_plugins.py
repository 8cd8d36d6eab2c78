"""The plugin graph: pluggy registration, entry points, ordering and failures."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import trio

from berth.core import errdefs
from berth.core.plugin import Registration, SkipPlugin
from berth.core.plugin.graph import collect, init_all, order, plugin_manager


async def _ok(ctx):  # noqa: ANN001, ANN202
    return object()


def _uris(rs: list[Registration]) -> list[str]:
    return [r.uri for r in rs]


def test_order_puts_required_types_first_and_star_last() -> None:
    rs = [
        Registration("t.grpc", "svc", _ok, requires=("t.meta", "t.event")),
        Registration("t.intro", "intro", _ok, requires=("*",)),
        Registration("t.event", "ex", _ok, requires=("t.meta",)),
        Registration("t.meta", "db", _ok),
    ]
    assert _uris(order(rs)) == ["t.meta.db", "t.event.ex", "t.grpc.svc", "t.intro.intro"]


def test_cycles_are_refused() -> None:
    rs = [Registration("a", "1", _ok, requires=("b",)),
          Registration("b", "1", _ok, requires=("a",))]
    with pytest.raises(ValueError, match="cycle"):
        order(rs)


async def test_failures_are_recorded_not_fatal(tmp_path: Path) -> None:
    async def boom(ctx):  # noqa: ANN001, ANN202
        raise RuntimeError("no kernel support")

    async def skip(ctx):  # noqa: ANN001, ANN202
        raise SkipPlugin("not on this host")

    async def uses(ctx):  # noqa: ANN001, ANN202
        return ctx.plugins.get("t.base")

    rs = [
        Registration("t.base", "bad", boom),
        Registration("t.snap", "skipped", skip),
        Registration("t.user", "needs-base", uses, requires=("t.base",)),
        Registration("t.ok", "fine", _ok, config={"a": 1}),
    ]
    async with trio.open_nursery() as nursery:
        ps = await init_all(rs, root=tmp_path, state=tmp_path,
                            plugin_config={"t.ok.fine": {"a": 2}},
                            daemon_config=None, nursery=nursery)
    by = {p.registration.uri: p for p in ps.ordered}
    assert "no kernel support" in str(by["t.base.bad"].error)
    assert by["t.snap.skipped"].skipped
    assert isinstance(by["t.user.needs-base"].error, errdefs.NotFound)
    assert by["t.ok.fine"].ok
    assert ps.by_type("t.ok")
    with pytest.raises(errdefs.NotFound):
        ps.get("t.base")


async def test_disabled_plugins_are_not_loaded(tmp_path: Path) -> None:
    rs = [Registration("t.a", "x", _ok), Registration("t.a", "y", _ok)]
    async with trio.open_nursery() as nursery:
        ps = await init_all(rs, root=tmp_path, state=tmp_path, plugin_config={},
                            daemon_config=None, nursery=nursery, disabled={"t.a.x"})
    assert [p.registration.id for p in ps.ordered] == ["y"]


def test_builtins_register_through_pluggy() -> None:
    from berth.core.daemon import BUILTIN_PLUGINS

    uris = _uris(collect(plugin_manager(BUILTIN_PLUGINS, entry_points=False)))
    assert "io.containerd.grpc.v1.namespaces" in uris
    assert "io.containerd.metadata.v1.sqlite" in uris


def test_third_party_package_registers_through_entry_points(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    # A real installed distribution (dist-info on sys.path) naming its module in berth.plugins.
    (tmp_path / "thirdparty_snap.py").write_text(textwrap.dedent("""
        from berth.core.plugin import Registration, hookimpl

        async def init(ctx):
            return "snapshotter instance"

        @hookimpl
        def berth_plugins():
            return [Registration(type="io.containerd.snapshotter.v1", id="thirdparty",
                                 init=init, config={"size": 3})]
    """))
    dist = tmp_path / "thirdparty_snap-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-snap\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[berth.plugins]\nthirdparty = thirdparty_snap\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        regs = collect(plugin_manager(["berth.core.services.version"]))
        assert "io.containerd.snapshotter.v1.thirdparty" in _uris(regs)
    finally:
        sys.modules.pop("thirdparty_snap", None)
