"""berth's plugin system: containerd's registration model, found and called through pluggy."""

from berth.core.plugin.hookspecs import hookimpl
from berth.core.plugin.registration import InitContext, Registration, SkipPlugin

__all__ = ["InitContext", "Registration", "SkipPlugin", "hookimpl"]
