"""The CRI plugin reads containerd 1.6's CRI section as it is, and hosts.toml dirs."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from berth.core import errdefs
from berth.core.distribution.hosts import Endpoint, Hosts, parse_hosts_toml
from berth.plugins.cri import config

# containerd 1.6's section as `containerd config default` prints it (abridged where
# nothing new is shown), with an operator's changes: a mirror, another runtime, limits.
CONTAINERD_16 = """
[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  enable_selinux = false
  enable_tls_streaming = false
  max_concurrent_downloads = 3
  max_container_log_line_size = 8192
  restrict_oom_score_adj = true
  sandbox_image = "registry.k8s.io/pause:3.6"
  stream_idle_timeout = "4h0m0s"
  stream_server_address = "127.0.0.1"
  stream_server_port = "10010"
  systemd_cgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "/etc/cni/net.d"
    conf_template = ""
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    disable_snapshot_annotations = true
    no_pivot = false
    snapshotter = "native"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes]
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        base_runtime_spec = ""
        pod_annotations = []
        privileged_without_host_devices = false
        runtime_engine = ""
        runtime_root = ""
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          BinaryName = "/usr/sbin/runc"
          SystemdCgroup = false
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.fast]
        runtime_type = "io.containerd.berth.v1"
        pod_annotations = ["io.example/*"]
  [plugins."io.containerd.grpc.v1.cri".image_decryption]
    key_model = "node"
  [plugins."io.containerd.grpc.v1.cri".registry]
    [plugins."io.containerd.grpc.v1.cri".registry.mirrors]
      [plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]
        endpoint = ["http://127.0.0.1:5000"]
"""


def _section(text: str) -> dict:
    return tomllib.loads(text)["plugins"]["io.containerd.grpc.v1.cri"]


def test_containerd_section_is_read_as_it_is(tmp_path: Path) -> None:
    cfg = config.parse(_section(CONTAINERD_16), state=tmp_path)
    assert cfg.address == tmp_path / "cri.sock"
    assert cfg.restrict_oom_score_adj is True
    assert cfg.max_container_log_line_size == 8192
    assert (cfg.stream_server_address, cfg.stream_server_port) == ("127.0.0.1", "10010")
    assert cfg.snapshotter == "native"
    assert (cfg.cni_bin_dir, cfg.cni_conf_dir) == ("/usr/lib/cni", "/etc/cni/net.d")
    assert cfg.runtime("").runtime_type == "io.containerd.runc.v2"
    assert cfg.runtime("runc").options["BinaryName"] == "/usr/sbin/runc"
    assert cfg.runtime("fast").runtime_type == "io.containerd.berth.v1"
    with pytest.raises(errdefs.NotFound, match="'kata'"):
        cfg.runtime("kata")
    eps = cfg.hosts.endpoints("docker.io")
    assert [e.base for e in eps] == ["http://127.0.0.1:5000/v2/",
                                     "https://registry-1.docker.io/v2/"]
    assert eps[0].capabilities == ("pull", "resolve")
    # Every key berth does not act on is named; those asking for more are singled out.
    assert "stream_idle_timeout" in cfg.unsupported
    assert "containerd.runtimes.runc.runtime_root" in cfg.unsupported
    assert "image_decryption.key_model" in cfg.unsupported
    assert cfg.changed == ["containerd.runtimes.fast.pod_annotations"]


def test_defaults_and_wrong_types(tmp_path: Path) -> None:
    cfg = config.parse({}, state=tmp_path)
    assert cfg.default_runtime_name == "runc" and set(cfg.runtimes) == {"runc", "berth"}
    assert cfg.unsupported == [] and cfg.snapshotter == "overlayfs"
    for bad in ({"restrict_oom_score_adj": "yes"}, {"stream_server_port": "http"},
                {"max_container_log_line_size": True}, {"sandbox_mode": "vm"},
                {"containerd": {"default_runtime_name": "nope"}},
                {"containerd": {"runtimes": {"x": {"runtime_type": "io.containerd.kata.v2"}}}},
                {"containerd": {"runtimes": {"runc": {"runtime_type": "io.containerd.runc.v2",
                                                      "options": {"SystemdCgroup": "1"}}}}},
                {"registry": {"config_path": "/etc/containerd/certs.d",
                              "mirrors": {"docker.io": {"endpoint": ["http://x"]}}}}):
        with pytest.raises(errdefs.InvalidArgument):
            config.parse(bad, state=tmp_path)


def test_hosts_toml_directory(tmp_path: Path) -> None:
    d = tmp_path / "certs.d"
    (d / "127.0.0.1:5000").mkdir(parents=True)
    (d / "127.0.0.1:5000" / "hosts.toml").write_text(
        'server = "http://127.0.0.1:5000"\n'
        '[host."https://mirror.local:8443/prefix"]\n'
        '  capabilities = ["pull"]\n  skip_verify = true\n  ca = "/etc/ca.pem"\n'
        '[host."http://127.0.0.1:6000/v2/custom"]\n  override_path = true\n')
    (d / "_default").mkdir()
    (d / "_default" / "hosts.toml").write_text('[host."http://127.0.0.1:7000"]\n')
    hosts = Hosts(str(tmp_path / "nowhere") + ":" + str(d))
    eps = hosts.endpoints("127.0.0.1:5000")
    assert [e.base for e in eps] == ["https://mirror.local:8443/prefix/v2/",
                                     "http://127.0.0.1:6000/v2/custom/",
                                     "http://127.0.0.1:5000/v2/"]
    assert eps[0] == Endpoint("https", "mirror.local:8443", "/prefix/v2", ("pull",), True,
                              ("/etc/ca.pem",))
    assert not eps[0].can("resolve") and eps[2].plain_http
    # No folder of its own: _default, then the host's own server.
    assert [e.base for e in hosts.endpoints("quay.io")] == [
        "http://127.0.0.1:7000/v2/", "https://quay.io/v2/"]
    assert [e.base for e in Hosts().endpoints("docker.io")] == [
        "https://registry-1.docker.io/v2/"]
    for bad in ("../etc", "a/b", ""):
        with pytest.raises(errdefs.InvalidArgument):
            hosts.endpoints(bad)


@pytest.mark.parametrize("text", [
    "server = 1", "[host]\nx = 1", '[host."ftp://x"]', '[host."http://x"]\ncapabilities = ["fly"]',
    '[host."http://x"]\nskip_verify = "no"', "server = [", '[host."http://x"]\nca = 3',
])
def test_hosts_toml_errors(text: str) -> None:
    with pytest.raises(errdefs.InvalidArgument):
        parse_hosts_toml("example.com", text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_hosts_toml_parser_never_fails_otherwise(text: str) -> None:
    try:
        eps = parse_hosts_toml("example.com", text)
    except errdefs.InvalidArgument:
        return
    assert eps and eps[-1].base.endswith("/")


def test_x509_key_pair_streaming(tmp_path: Path) -> None:
    """containerd's rules: both files or neither, and only with enable_tls_streaming."""
    pair = {"tls_cert_file": "/etc/berth/s.crt", "tls_key_file": "/etc/berth/s.key"}
    cfg = config.parse({"enable_tls_streaming": True, "x509_key_pair_streaming": pair},
                       state=tmp_path)
    assert (cfg.stream_tls_cert_file, cfg.stream_tls_key_file) == tuple(pair.values())
    assert cfg.unsupported == []
    for section, why in (
            ({"enable_tls_streaming": True,
              "x509_key_pair_streaming": {"tls_cert_file": "/c"}}, "tls_key_file must be set"),
            ({"enable_tls_streaming": True,
              "x509_key_pair_streaming": {"tls_key_file": "/k"}}, "tls_cert_file must be set"),
            ({"x509_key_pair_streaming": pair}, "enable_tls_streaming is not"),
            ({"x509_key_pair_streaming": {"tls_cert_file": 1}}, "expected str"),
            ({"x509_key_pair_streaming": "yes"}, "expected a table")):
        with pytest.raises(errdefs.InvalidArgument, match=why):
            config.parse(section, state=tmp_path)
    empty = config.parse({"x509_key_pair_streaming": {"tls_cert_file": "", "tls_key_file": ""}},
                         state=tmp_path)
    assert empty.stream_tls_cert_file == "" and empty.unsupported == []
