"""The client-side default OCI spec and its options, against containerd's defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from berth.core import errdefs
from berth.core.oci import default_spec as ds

# containerd 1.6 oci/spec.go defaultUnixCaps, in its order.
CONTAINERD_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]


def test_default_spec_matches_containerd() -> None:
    s = ds.default_unix_spec("default", "c1")
    assert s["ociVersion"] == "1.0.2-dev"
    assert s["root"] == {"path": "rootfs"}
    p = s["process"]
    assert p["cwd"] == "/" and p["user"] == {"uid": 0, "gid": 0}
    assert p["noNewPrivileges"] is True
    assert p["capabilities"] == {"bounding": CONTAINERD_CAPS, "effective": CONTAINERD_CAPS,
                                 "permitted": CONTAINERD_CAPS}
    assert "inheritable" not in p["capabilities"]
    assert p["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]
    linux = s["linux"]
    assert linux["cgroupsPath"] == "/default/c1"
    assert [n["type"] for n in linux["namespaces"]] == ["pid", "ipc", "uts", "mount",
                                                        "network"]
    assert linux["maskedPaths"] == [
        "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
        "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
        "/proc/scsi"]
    assert linux["readonlyPaths"] == ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                                      "/proc/sysrq-trigger"]
    assert linux["resources"] == {"devices": [{"allow": False, "access": "rwm"}]}
    assert [(m["destination"], m["type"], m["source"]) for m in s["mounts"]] == [
        ("/proc", "proc", "proc"), ("/dev", "tmpfs", "tmpfs"), ("/dev/pts", "devpts", "devpts"),
        ("/dev/shm", "tmpfs", "shm"), ("/dev/mqueue", "mqueue", "mqueue"),
        ("/sys", "sysfs", "sysfs"), ("/run", "tmpfs", "tmpfs")]
    assert s["mounts"][0]["options"] == ["nosuid", "noexec", "nodev"]
    assert s["mounts"][2]["options"] == ["nosuid", "noexec", "newinstance", "ptmxmode=0666",
                                         "mode=0620", "gid=5"]
    assert s["mounts"][5]["options"] == ["nosuid", "noexec", "nodev", "ro"]
    # Each spec has its own lists: changing one leaves the next default alone.
    p["capabilities"]["bounding"].append("CAP_SYS_ADMIN")
    assert ds.default_unix_spec("default", "c1")["process"]["capabilities"]["bounding"] \
        == CONTAINERD_CAPS


def test_default_spec_needs_a_namespace() -> None:
    with pytest.raises(errdefs.FailedPrecondition):
        ds.default_unix_spec("", "c1")


def test_cgroup_path_joins_like_filepath_join() -> None:
    assert ds.cgroup_path("ns", "id") == "/ns/id"
    s = ds.default_unix_spec("default", "c1")
    ds.with_namespaced_cgroup(s, "other", "x")
    assert s["linux"]["cgroupsPath"] == "/other/x"


def test_default_unix_devices() -> None:
    s = ds.default_unix_spec("default", "c1")
    ds.with_default_unix_devices(s)
    devices = s["linux"]["resources"]["devices"]
    assert devices[0] == {"allow": False, "access": "rwm"}
    assert devices[1] == {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"}
    assert [(d.get("major"), d.get("minor")) for d in devices[1:]] == [
        (1, 3), (1, 8), (1, 7), (5, 0), (1, 5), (1, 9), (5, 1), (136, None), (5, 2)]
    pts = devices[8]
    assert "minor" not in pts and pts["allow"] is True


@pytest.mark.parametrize(("defaults", "overrides", "expected"), [
    (["A=1", "B=2"], ["B=3", "C=4"], ["A=1", "B=3", "C=4"]),
    (["A=1", "B=2"], ["A"], ["B=2"]),  # a bare name unsets
    (["A=1"], ["X"], ["A=1"]),  # unsetting what is not there does nothing
    ([], ["A=1", "A=2"], ["A=2"]),
    (["PATH=/bin"], ["PATH=/usr/bin:/bin", "TERM=xterm"], ["PATH=/usr/bin:/bin", "TERM=xterm"]),
])
def test_replace_or_append_env(defaults: list[str], overrides: list[str],
                               expected: list[str]) -> None:
    assert ds.replace_or_append_env(defaults, overrides) == expected


def test_small_options() -> None:
    s = ds.default_unix_spec("default", "c1")
    ds.with_env(s, ["A=1"])
    ds.with_tty(s)
    ds.with_process_args(s, ["sh", "-c", "true"])
    ds.with_process_cwd(s, "/tmp")
    ds.with_hostname(s, "box")
    ds.with_rootfs_path(s, "/var/rootfs")
    ds.with_mounts(s, [{"destination": "/data", "type": "bind", "source": "/srv",
                        "options": ["rbind", "ro"]}])
    ds.with_host_namespace(s, "network")
    ds.with_cpu_shares(s, 512)
    ds.with_annotations(s, {"a": "b"})
    assert s["process"]["terminal"] is True
    assert s["process"]["env"] == ["A=1", "TERM=xterm"]
    assert s["process"]["args"] == ["sh", "-c", "true"]
    assert s["process"]["cwd"] == "/tmp"
    assert s["hostname"] == "box"
    assert s["root"]["path"] == "/var/rootfs"
    assert s["mounts"][-1]["destination"] == "/data"
    assert [n["type"] for n in s["linux"]["namespaces"]] == ["pid", "ipc", "uts", "mount"]
    assert s["linux"]["resources"]["cpu"] == {"shares": 512}
    assert s["annotations"] == {"a": "b"}


def _rootfs(tmp_path: Path, passwd: str | None, group: str | None) -> ds.UserDB:
    etc = tmp_path / "etc"
    etc.mkdir()
    if passwd is not None:
        (etc / "passwd").write_text(passwd)
    if group is not None:
        (etc / "group").write_text(group)
    return ds.UserDB.from_root(tmp_path)


PASSWD = ("root:x:0:0:root:/root:/bin/sh\n"
          "daemon:x:1:1::/:/bin/false\n"
          "app:x:1000:1001:App:/home/app:/bin/sh\n")
GROUP = ("root:x:0:\n"
         "# a comment\n"
         "daemon:x:1:\n"
         "appgroup:x:1001:\n"
         "wheel:x:10:root,app\n"
         "audio:x:29:app\n")


def _user(s: dict) -> dict:
    return s["process"]["user"]


def test_with_user_forms(tmp_path: Path) -> None:
    users = _rootfs(tmp_path, PASSWD, GROUP)
    s = ds.default_unix_spec("default", "c1")
    ds.with_user(s, "app", users)
    assert _user(s) == {"uid": 1000, "gid": 1001, "additionalGids": [1001]}
    ds.with_user(s, "1000", users)  # a known uid takes its passwd gid
    assert _user(s)["gid"] == 1001
    ds.with_user(s, "4242", users)  # an unknown uid gets gid 0
    assert _user(s) == {"uid": 4242, "gid": 0, "additionalGids": [0]}
    ds.with_user(s, "5:6", users)
    assert _user(s) == {"uid": 5, "gid": 6, "additionalGids": [6]}
    ds.with_user(s, "app:wheel", users)
    assert _user(s) == {"uid": 1000, "gid": 10, "additionalGids": [10]}
    ds.with_user(s, "7:audio", users)
    assert (_user(s)["uid"], _user(s)["gid"]) == (7, 29)
    with pytest.raises(errdefs.NotFound):
        ds.with_user(s, "nobody", users)
    with pytest.raises(errdefs.NotFound):
        ds.with_user(s, "app:nogroup", users)
    with pytest.raises(errdefs.InvalidArgument):
        ds.with_user(s, "a:b:c", users)


def test_with_user_without_passwd(tmp_path: Path) -> None:
    users = _rootfs(tmp_path, None, None)
    s = ds.default_unix_spec("default", "c1")
    ds.with_user(s, "33", users)  # numeric ids need no passwd
    assert _user(s) == {"uid": 33, "gid": 0, "additionalGids": [0]}
    with pytest.raises(errdefs.NotFound, match="passwd"):
        ds.with_user(s, "app", users)


def test_additional_gids(tmp_path: Path) -> None:
    users = _rootfs(tmp_path, PASSWD, GROUP)
    s = ds.default_unix_spec("default", "c1")
    ds.with_additional_gids(s, "root", users)
    assert _user(s)["additionalGids"] == [0, 10]
    ds.with_user(s, "app", users)
    ds.with_additional_gids(s, "1000", users)  # by uid: the user's name is looked up
    assert _user(s)["additionalGids"] == [1001, 10, 29]
    ds.with_additional_gids(s, "4242", users)  # unknown uid: only the primary group
    assert _user(s)["additionalGids"] == [1001]


def test_passwd_lookup_stays_in_the_rootfs(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (tmp_path / "evil").write_text("app:x:0:0::/:/bin/sh\n")
    # A link pointing outside is resolved inside the root, where there is nothing.
    (root / "etc" / "passwd").symlink_to("../../evil")
    users = ds.UserDB.from_root(root)
    assert users.users is None
    (root / "etc" / "real").write_text("app:x:5:6::/:/bin/sh\n")
    (root / "etc" / "passwd").unlink()
    (root / "etc" / "passwd").symlink_to("/etc/real")
    assert ds.UserDB.from_root(root).user(name="app") == ds.User("app", 5, 6)


IMAGE_CONFIG = {
    "architecture": "amd64", "os": "linux",
    "config": {"Env": ["PATH=/bin", "LANG=C"], "Entrypoint": ["/entry"], "Cmd": ["serve"],
               "WorkingDir": "/work", "User": "app",
               "Labels": {"org.example": "yes"}, "StopSignal": "SIGQUIT"},
}


def test_with_image_config(tmp_path: Path) -> None:
    users = _rootfs(tmp_path, PASSWD, GROUP)
    s = ds.default_unix_spec("default", "c1")
    ds.with_env(s, ["LANG=en", "EXTRA=1"])
    ds.with_image_config(s, IMAGE_CONFIG, users)
    p = s["process"]
    assert p["env"] == ["PATH=/bin", "LANG=en", "EXTRA=1"]
    assert p["args"] == ["/entry", "serve"]
    assert p["cwd"] == "/work"
    assert p["user"] == {"uid": 1000, "gid": 1001, "additionalGids": [1001, 10, 29]}
    assert ds.image_labels(IMAGE_CONFIG) == {"org.example": "yes"}
    assert ds.image_stop_signal(IMAGE_CONFIG) == "SIGQUIT"
    assert ds.image_stop_signal({"config": {}}) == "SIGTERM"


def test_with_image_config_defaults(tmp_path: Path) -> None:
    users = _rootfs(tmp_path, PASSWD, GROUP)
    s = ds.default_unix_spec("default", "c1")
    ds.with_image_config(s, {"config": {"Cmd": ["sh"]}}, users, args=["echo", "hi"])
    p = s["process"]
    assert p["env"] == [ds.DEFAULT_PATH_ENV]
    assert p["args"] == ["echo", "hi"]
    assert p["cwd"] == "/"
    assert p["user"] == {"uid": 0, "gid": 0, "additionalGids": [0, 10]}


def test_build_for_an_image_replaces_args_like_ctr(tmp_path: Path) -> None:
    users = _rootfs(tmp_path, PASSWD, GROUP)
    opts = ds.Options(args=["id"], tty=True, env=["X=1"], cpu_shares=1024,
                      annotations={"l": "v"})
    s = ds.build("ns", "c2", opts, users, IMAGE_CONFIG)
    # ctr's WithProcessArgs comes after the image config: the entrypoint is dropped.
    assert s["process"]["args"] == ["id"]
    assert s["process"]["env"] == ["PATH=/bin", "LANG=C", "X=1", "TERM=xterm"]
    assert s["process"]["terminal"] is True
    assert s["linux"]["cgroupsPath"] == "/ns/c2"
    assert s["linux"]["resources"]["cpu"] == {"shares": 1024}
    assert len(s["linux"]["resources"]["devices"]) == 10
    assert s["annotations"] == {"l": "v"}


def test_build_for_a_rootfs(tmp_path: Path) -> None:
    users = _rootfs(tmp_path, PASSWD, GROUP)
    opts = ds.Options(args=["echo", "hi"], rootfs=str(tmp_path), net_host=True,
                      host_hostname="host1", user="app")
    s = ds.build("default", "c3", opts, users)
    assert s["root"] == {"path": str(tmp_path)}
    assert s["process"]["env"] == [ds.DEFAULT_PATH_ENV, "HOSTNAME=host1"]
    assert s["process"]["user"]["uid"] == 1000
    assert "network" not in [n["type"] for n in s["linux"]["namespaces"]]
    assert [m["destination"] for m in s["mounts"][-2:]] == ["/etc/hosts", "/etc/resolv.conf"]
    assert s["mounts"][-1]["options"] == ["rbind", "ro"]


@pytest.mark.parametrize(("flag", "expected"), [
    ("type=bind,src=/tmp,dst=/host,options=rbind:ro",
     {"destination": "/host", "type": "bind", "source": "/tmp", "options": ["rbind", "ro"]}),
    ("type=tmpfs,destination=/scratch,source=tmpfs",
     {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs"}),
    ('type=bind,"src=/a,b",dst=/c', {"destination": "/c", "type": "bind", "source": "/a,b"}),
])
def test_parse_mount_flag(flag: str, expected: dict) -> None:
    assert ds.parse_mount_flag(flag) == expected


@pytest.mark.parametrize("flag", ["type=bind,src", "type=bind,mode=ro"])
def test_parse_mount_flag_rejects(flag: str) -> None:
    with pytest.raises(errdefs.InvalidArgument):
        ds.parse_mount_flag(flag)


def test_marshal_writes_go_order_and_omits_empty() -> None:
    s = ds.default_unix_spec("default", "c1")
    ds.with_process_args(s, ["true"])
    ds.with_annotations(s, {})
    s["process"]["env"] = []
    raw = ds.marshal(s)
    assert raw.startswith(b'{"ociVersion":"1.0.2-dev","process":{"user":{"uid":0,"gid":0},'
                          b'"args":["true"],"cwd":"/","capabilities":{"bounding":')
    doc = json.loads(raw)
    assert list(doc) == ["ociVersion", "process", "root", "mounts", "linux"]
    assert list(doc["linux"]) == ["resources", "cgroupsPath", "namespaces", "maskedPaths",
                                  "readonlyPaths"]
    assert "env" not in doc["process"] and "annotations" not in doc
    # "allow": false is written (no omitempty in specs-go), uid 0 too.
    assert doc["linux"]["resources"]["devices"] == [{"allow": False, "access": "rwm"}]
    assert b" " not in raw.replace(b"RLIMIT_NOFILE", b"")


def test_any_round_trip() -> None:
    s = ds.default_unix_spec("default", "c1")
    msg = ds.to_any(s)
    assert msg.type_url == "types.containerd.io/opencontainers/runtime-spec/1/Spec"
    assert ds.from_any(msg) == json.loads(ds.marshal(s))
    p = ds.process_any(s["process"])
    assert p.type_url == "types.containerd.io/opencontainers/runtime-spec/1/Process"
    assert json.loads(p.value)["cwd"] == "/"
    assert ds.from_any(None) == {}
    with pytest.raises(errdefs.InvalidArgument):
        ds.from_any(type(msg)(type_url=ds.SPEC_TYPE_URL, value=b"[1]"))
