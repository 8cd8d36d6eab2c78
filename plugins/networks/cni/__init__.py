"""The ``cni`` network plugin: the real CNI binaries, driven with containerd's conventions."""
