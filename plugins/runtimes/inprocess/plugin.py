"""``io.berth.oci-runtime.v1.berth``: the in-process runtime, for containers naming no binary."""

from __future__ import annotations

from berth.core.plugin import Registration, hookimpl
from berth.core.shim.runtimes import NO_BINARY, OCIRuntimePlugin

PLUGIN = OCIRuntimePlugin(
    id="berth",
    new="berth.plugins.runtimes.inprocess.shim:new",
    delete="berth.plugins.runtimes.inprocess.shim:force_delete",
    binaries=(NO_BINARY,),
)


@hookimpl
def berth_plugins() -> list[Registration]:
    return [PLUGIN.registration()]
