"""``io.berth.oci-runtime.v1.runc``: runc-compatible binaries (runc, crun) for berth's shim."""

from __future__ import annotations

from berth.core.plugin import Registration, hookimpl
from berth.core.shim.runtimes import ANY_BINARY, OCIRuntimePlugin

PLUGIN = OCIRuntimePlugin(
    id="runc",
    new="berth.plugins.runtimes.ocicli.shim:new",
    delete="berth.plugins.runtimes.ocicli.shim:force_delete",
    binaries=(ANY_BINARY,),
)


@hookimpl
def berth_plugins() -> list[Registration]:
    return [PLUGIN.registration()]
