"""The shim finds its OCI runtimes through plugin registrations (issue 10.2)."""

from __future__ import annotations

import sys
import types

import pytest

from berth.core import errdefs
from berth.core.plugin import Registration, hookimpl
from berth.core.plugin.registration import OCI_RUNTIME
from berth.core.shim import options, runtimes
from berth.core.shim.runtimes import OCIRuntimePlugin


def _third_party(name: str) -> str:
    """A plugin module as another package would ship it, serving the binary ``youki``."""
    module = types.ModuleType(name)

    def new(choice: options.RuntimeChoice, bundle: str, reaper: object) -> tuple:
        return ("youki", choice.root, bundle)

    def force_delete(choice: options.RuntimeChoice, container_id: str) -> str:
        return f"youki deleted {container_id}"

    module.new = new  # type: ignore[attr-defined]
    module.force_delete = force_delete  # type: ignore[attr-defined]
    plugin = OCIRuntimePlugin(id="youki", new=f"{name}:new", delete=f"{name}:force_delete",
                              binaries=("youki",))

    @hookimpl
    def berth_plugins() -> list[Registration]:
        return [plugin.registration()]

    module.berth_plugins = berth_plugins  # type: ignore[attr-defined]
    sys.modules[name] = module
    return name


def test_builtin_runtimes_are_registrations() -> None:
    found = runtimes.registered(entry_points=False)
    assert [p.id for p in found] == ["runc", "berth"]
    assert runtimes.find(options.RuntimeChoice(binary="/usr/sbin/runc"), found).id == "runc"
    assert runtimes.find(options.RuntimeChoice(binary="crun"), found).id == "runc"
    assert runtimes.find(options.RuntimeChoice(), found).id == "berth"


def test_a_third_party_runtime_serves_its_binary_with_no_change_to_core() -> None:
    name = _third_party("berth_test_youki_plugin")
    try:
        found = runtimes.registered((name, *runtimes.BUILTIN), entry_points=False)
        choice = options.RuntimeChoice(binary="/opt/bin/youki", root="/r/ns")
        plugin = runtimes.find(choice, found)
        assert plugin.id == "youki"
        assert runtimes.resolve(plugin.new)(choice, "/b", None) == ("youki", "/r/ns", "/b")
        choice.cleanup = plugin.delete
        assert runtimes.force_delete(choice, "c1") == "youki deleted c1"
        # other binaries still reach the built-in runc plugin
        assert runtimes.find(options.RuntimeChoice(binary="runc"), found).id == "runc"
    finally:
        sys.modules.pop(name, None)


def test_no_runtime_serves_is_an_error() -> None:
    only_inprocess = [p for p in runtimes.registered(entry_points=False) if p.id == "berth"]
    with pytest.raises(errdefs.NotFound, match="no OCI runtime plugin"):
        runtimes.find(options.RuntimeChoice(binary="runc"), only_inprocess)


def test_runtime_registrations_have_the_oci_runtime_type() -> None:
    from berth.plugins.runtimes.ocicli.plugin import berth_plugins

    (reg,) = berth_plugins()
    assert reg.type == OCI_RUNTIME and reg.uri == "io.berth.oci-runtime.v1.runc"
    assert isinstance(reg.init, OCIRuntimePlugin)


def test_choice_records_the_cleanup_entry(tmp_path: object) -> None:
    choice = options.RuntimeChoice(binary="runc", root="/r/ns", cleanup="m:f")
    options.save(str(tmp_path), choice)
    assert options.load(str(tmp_path)).cleanup == "m:f"  # type: ignore[union-attr]
