"""OCI runtimes with a runc-compatible command line (runc, crun) behind ``OCIRuntime``."""

from berth.plugins.runtimes.ocicli.runtime import Runtime, classify, resolve

__all__ = ["Runtime", "classify", "resolve"]
