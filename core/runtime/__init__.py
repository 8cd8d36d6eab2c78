"""Runtime v2: shims started with containerd's shim v2 protocol and driven over ttrpc."""
