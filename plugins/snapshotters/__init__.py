"""Snapshotter backends: overlayfs and native (plugin type io.containerd.snapshotter.v1)."""
