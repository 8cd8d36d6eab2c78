"""Which network namespace path the cni plugin hands its binaries (CNI_NETNS)."""

from __future__ import annotations

from pathlib import Path

from berth.core.networks.types import SetupRequest
from berth.plugins.networks.cni.plugin import CNINetworks


def _plugin(tmp: Path) -> CNINetworks:
    return CNINetworks({"conf_dir": str(tmp), "bin_dirs": [str(tmp)], "exec_timeout": 5,
                        "loopback": True})


def test_del_in_a_placeholder_never_pinned_names_no_namespace(tmp_path: Path) -> None:
    """berthd killed between making the pin's file and pinning the namespace: no ADD
    ran in it, and a DEL given the plain file would fail (not a namespace) forever,
    keeping the attachment and its file; without a namespace DEL releases the rest."""
    cni = _plugin(tmp_path)
    placeholder = tmp_path / "k8s.io@pod"
    placeholder.touch()
    req = SetupRequest(namespace="k8s.io", id="pod", netns=str(placeholder))
    assert cni._inv("DEL", req).netns == ""
    assert cni._inv("ADD", req).netns == str(placeholder)
    gone = SetupRequest(namespace="k8s.io", id="pod", netns=str(tmp_path / "gone"))
    assert cni._inv("DEL", gone).netns == ""
    # A real namespace is handed on.
    real = SetupRequest(namespace="k8s.io", id="pod", netns="/proc/self/ns/net")
    assert cni._inv("DEL", real).netns == "/proc/self/ns/net"
