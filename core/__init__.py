"""berth: a containerd-compatible container supervisor on trio."""

__version__ = "0.1.0"
