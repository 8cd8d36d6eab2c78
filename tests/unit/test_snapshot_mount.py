"""Mount option handling and the syscall plan, without mounting anything."""

from __future__ import annotations

import pytest

from berth.core import errdefs, mount as m
from berth.core.mount import Mount, MountCall


def test_flag_words_become_flags_and_the_rest_is_data() -> None:
    p = m.parse_options(["ro", "nosuid", "nodev", "lowerdir=/a:/b", "index=off", "defaults"])
    assert p.flags == m.MS_RDONLY | m.MS_NOSUID | m.MS_NODEV
    assert p.data == "lowerdir=/a:/b,index=off"
    assert not p.loop


def test_clearing_words_undo_earlier_ones() -> None:
    assert m.parse_options(["ro", "rw"]).flags == 0
    assert m.parse_options(["nosuid", "suid", "noexec"]).flags == m.MS_NOEXEC
    assert m.parse_options(["rbind"]).flags == m.MS_BIND | m.MS_REC
    assert m.parse_options(["loop"]).loop


def test_rw_bind_is_one_call() -> None:
    calls = m.plan(Mount("bind", "/src", ["rw", "rbind"]), "/dst")
    assert calls == [MountCall("/src", "/dst", "bind", m.MS_BIND | m.MS_REC, "")]


def test_ro_bind_needs_a_remount() -> None:
    calls = m.plan(Mount("bind", "/src", ["ro", "rbind"]), "/dst")
    flags = m.MS_BIND | m.MS_REC | m.MS_RDONLY
    assert calls == [
        MountCall("/src", "/dst", "bind", flags, ""),
        MountCall("", "/dst", "", flags | m.MS_REMOUNT, ""),
    ]


def test_propagation_is_a_separate_call_without_the_other_flags() -> None:
    calls = m.plan(Mount("bind", "/src", ["rbind", "rprivate", "nosuid"]), "/dst")
    assert calls == [
        MountCall("/src", "/dst", "bind", m.MS_BIND | m.MS_REC | m.MS_NOSUID, ""),
        MountCall("", "/dst", "", m.MS_PRIVATE | m.MS_REC, ""),
    ]


def test_overlay_passes_options_as_data() -> None:
    opts = ["index=off", "workdir=/s/2/work", "upperdir=/s/2/fs", "lowerdir=/s/1/fs"]
    (call,) = m.plan(Mount("overlay", "overlay", opts), "/t")
    assert call == MountCall("overlay", "/t", "overlay", 0, ",".join(opts))


def test_plain_remount_without_data_skips_the_first_call() -> None:
    calls = m.plan(Mount("", "", ["remount", "ro", "bind"]), "/t")
    assert calls == [MountCall("", "/t", "", m.MS_REMOUNT | m.MS_RDONLY | m.MS_BIND, "")]


def test_compact_lowerdir_moves_the_common_parent_out() -> None:
    opts = ["index=off", "lowerdir=/var/lib/s/snapshots/12/fs:/var/lib/s/snapshots/3/fs",
            "workdir=/w"]
    chdir, out = m.compact_lowerdir(opts)
    assert chdir == "/var/lib/s/snapshots/"
    assert out == ["index=off", "workdir=/w", "lowerdir=12/fs:3/fs"]


@pytest.mark.parametrize("opts", [
    ["lowerdir=/a/fs"],                 # a single lower: nothing to gain
    ["lowerdir=/a:/b"],                 # only "/" in common
    ["upperdir=/x"],                    # no lowerdir at all
])
def test_compact_lowerdir_leaves_alone(opts: list[str]) -> None:
    assert m.compact_lowerdir(opts) == ("", opts)


def test_long_overlay_options_plan_a_chdir() -> None:
    lowers = [f"/var/lib/berth/snapshots/{i}/fs" for i in range(200, 0, -1)]
    opts = ["index=off", "lowerdir=" + ":".join(lowers)]
    assert sum(map(len, opts)) >= m.PAGE_SIZE - 512
    (call,) = m.plan(Mount("overlay", "overlay", opts), "/t")
    assert call.chdir == "/var/lib/berth/snapshots/"
    assert call.data.endswith("lowerdir=" + ":".join(f"{i}/fs" for i in range(200, 0, -1)))
    assert call.data.startswith("index=off,")


def test_options_larger_than_a_page_are_refused() -> None:
    lowers = [f"/x{i}/{'y' * 60}" for i in range(100)]  # no common parent to factor out
    with pytest.raises(errdefs.InvalidArgument, match="mount options is too long"):
        m.plan(Mount("overlay", "overlay", ["lowerdir=" + ":".join(lowers)]), "/t")


def test_loop_and_fuse_are_not_supported() -> None:
    with pytest.raises(errdefs.NotImplemented_):
        m.plan(Mount("ext4", "/img", ["loop"]), "/t")
    with pytest.raises(errdefs.NotImplemented_):
        m.plan(Mount("fuse.sshfs", "host:/", []), "/t")


def test_readonly_turns_upperdir_into_a_lowerdir() -> None:
    mounts = [
        Mount("overlay", "overlay", ["index=off", "workdir=/2/work", "upperdir=/2/fs",
                                     "lowerdir=/1/fs"]),
        Mount("bind", "/x", ["rw", "rbind"]),
        Mount("bind", "/y", ["rbind", "ro"]),
    ]
    assert m.readonly(mounts) == [
        Mount("overlay", "overlay", ["index=off", "lowerdir=/2/fs:/1/fs"]),
        Mount("bind", "/x", ["rbind", "ro"]),
        Mount("bind", "/y", ["rbind", "ro"]),
    ]
    # The input is not modified.
    assert mounts[1].options == ["rw", "rbind"]


def test_mount_round_trips_through_the_api_type() -> None:
    mnt = Mount("overlay", "overlay", ["lowerdir=/a:/b"])
    api = mnt.to_proto()
    assert (api.type, api.source, api.options) == ("overlay", "overlay", ["lowerdir=/a:/b"])
    assert Mount.from_proto(api) == mnt


def test_mountinfo_escapes_are_decoded() -> None:
    assert m._unescape(r"/tmp/a\040b\134c") == "/tmp/a b\\c"
    assert "/" in m.mountpoints()
    assert m.mountpoints("/proc") == [p for p in m.mountpoints()
                                      if p == "/proc" or p.startswith("/proc/")]
