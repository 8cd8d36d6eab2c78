"""berth's plugin system: containerd's registration model, found and called through pluggy."""

from core.plugin.hookspecs import hookimpl
from core.plugin.registration import InitContext, Registration, SkipPlugin

__all__ = ["InitContext", "Registration", "SkipPlugin", "hookimpl"]
