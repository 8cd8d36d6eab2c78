"""Hand-written protobuf of the short-lived actions, checked against betterproto."""

from __future__ import annotations

from datetime import UTC, datetime

import betterproto.lib.google.protobuf as pb
import pytest

from berth.core.api.containerd.runc.v1 import Options
from berth.core.api.containerd.task.v2 import DeleteResponse
from berth.core.shim import metrics, options, start, wire


def test_delete_response_matches_generated_encoding():
    at = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    ns = int(at.timestamp()) * 1_000_000_000 + 123456000
    ours = wire.delete_response(4242, 137, ns)
    assert ours == bytes(DeleteResponse(pid=4242, exit_status=137, exited_at=at))
    parsed = DeleteResponse().parse(ours)
    assert (parsed.pid, parsed.exit_status, parsed.exited_at) == (4242, 137, at)


def test_delete_response_without_pid_still_parses():
    parsed = DeleteResponse().parse(wire.delete_response(0, 137))
    assert parsed.pid == 0 and parsed.exit_status == 137
    assert parsed.exited_at.year >= 2024


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**32 - 1, 2**63, -1])
def test_varint_round_trip(value):
    encoded = wire.uint_field(1, value)
    if value == 0:
        assert encoded == b""
        return
    [(number, kind, decoded)] = list(wire.fields(encoded))
    assert (number, kind) == (1, wire.WIRE_VARINT)
    assert decoded == value & (2**64 - 1)


def test_any_decoding_and_shim_cgroup_from_stdin_options():
    opts = Options(binary_name="crun", shim_cgroup="/shims/x", root="/r")
    raw = bytes(pb.Any(type_url="containerd.runc.v1.Options", value=bytes(opts)))
    assert wire.decode_any(raw) == ("containerd.runc.v1.Options", bytes(opts))
    assert start.shim_cgroup(raw) == "/shims/x"
    assert start.shim_cgroup(b"") == ""
    other = bytes(pb.Any(type_url="runtimeoptions.v1.Options", value=b"\x12\x02/x"))
    assert start.shim_cgroup(other) == ""


def test_truncated_input_is_an_error():
    with pytest.raises(wire.DecodeError):
        list(wire.fields(b"\x0a\x05ab"))
    with pytest.raises(wire.DecodeError):
        list(wire.fields(b"\x08"))


def test_runtime_choice_from_runc_options():
    value = bytes(Options(binary_name="runc", root="/custom", systemd_cgroup=True,
                          no_pivot_root=True, io_uid=5))
    choice = options.choose("containerd.runc.v1.Options", value, namespace="ns",
                            state_base="/run/containerd")
    assert (choice.binary, choice.root, choice.systemd_cgroup, choice.no_pivot_root,
            choice.io_uid) == ("runc", "/custom/ns", True, True, 5)
    # The type URL may carry a "types.googleapis.com/" style prefix.
    assert options.choose("types.googleapis.com/containerd.runc.v1.Options", value,
                          namespace="ns", state_base="/x").binary == "runc"


def test_default_choice_is_in_process_under_the_daemon_state():
    choice = options.choose("", b"", namespace="default", state_base="/run/containerd")
    assert (choice.binary, choice.root, choice.name) == ("", "/run/containerd/berth/default",
                                                          "berth")
    runc = options.choose("containerd.runc.v1.Options", bytes(Options(binary_name="runc")),
                          namespace="default", state_base="/run/containerd")
    assert runc.root == "/run/containerd/runc/default"  # where the runc shim keeps it too


def test_runtime_config_path_options(tmp_path):
    config = tmp_path / "rt.toml"
    config.write_text('BinaryName = "crun"\nSystemdCgroup = true\nunrelated = 1\n')
    value = b"\x0a\x03abc\x12" + bytes([len(str(config))]) + str(config).encode()
    choice = options.choose("runtimeoptions.v1.Options", value, namespace="n",
                            state_base="/s")
    assert (choice.binary, choice.systemd_cgroup, choice.root) == ("crun", True, "/s/crun/n")
    config.write_text("not toml ===")
    with pytest.raises(Exception, match="runtime config"):
        options.choose("runtimeoptions.v1.Options", value, namespace="n", state_base="/s")


def test_unknown_options_type_is_refused():
    with pytest.raises(Exception, match="unsupported runtime options type x.Y"):
        options.choose("x.Y", b"", namespace="n", state_base="/s")


def test_choice_round_trips_through_the_bundle(tmp_path):
    choice = options.RuntimeChoice(binary="runc", root="/r/ns", no_new_keyring=True)
    options.save(str(tmp_path), choice)
    assert options.load(str(tmp_path)) == choice
    assert options.load(str(tmp_path / "missing")) is None


def _decode(data: bytes) -> dict:
    """A generic protobuf decode: number → list of values (messages as bytes)."""
    out: dict[int, list] = {}
    for number, _, value in wire.fields(data):
        out.setdefault(number, []).append(value)
    return out


def test_metrics_encoding_uses_cgroups_v1_field_numbers():
    stats = {
        "pids": {"current": 5, "limit": 100},
        "cpu": {"usage_total": 1000, "usage_user": 600, "usage_kernel": 400, "nr_periods": 7,
                "throttled_periods": 2, "throttled_time": 50},
        "memory": {"usage": 4096, "limit": 8192, "max_usage": 5000, "failcnt": 1,
                   "swap_usage": 10, "swap_limit": 20, "oom_kill": 3,
                   "stat": {"cache": 11, "rss": 22, "total_rss": 33, "pgfault": 44}},
    }
    top = _decode(metrics.encode(stats))
    pids = _decode(top[2][0])
    assert (pids[1], pids[2]) == ([5], [100])
    cpu = _decode(top[3][0])
    usage, throttle = _decode(cpu[1][0]), _decode(cpu[2][0])
    assert (usage[1], usage[2], usage[3]) == ([1000], [400], [600])
    assert (throttle[1], throttle[2], throttle[3]) == ([7], [2], [50])
    memory = _decode(top[4][0])
    assert (memory[1], memory[2], memory[19], memory[9]) == ([11], [22], [33], [44])
    entry = _decode(memory[33][0])
    assert (entry[1], entry[2], entry[3], entry[4]) == ([8192], [4096], [5000], [1])
    swap = _decode(memory[34][0])
    assert (swap[1], swap[2]) == ([20], [10])
    assert _decode(top[9][0])[3] == [3]
    assert metrics.encode({}) == b""
