"""berth: a ctr-style command line client for berthd (and for containerd)."""

from berth.core.cli.app import main

__all__ = ["main"]
