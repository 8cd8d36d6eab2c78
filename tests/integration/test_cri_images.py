"""CRI on a real berthd: the plugin's own socket and berthd's main one, Version, Status,
RuntimeConfig, and the ImageService pulling from a real registry (Debian's
docker-registry on 127.0.0.1) through a hosts.toml mirror, as the kubelet drives it."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from berth.core.api.runtime import v1 as api
from tests import daemons
from tests.cri import CRIClient, cri_config, hosts_dir

if TYPE_CHECKING:
    from tests.images import Image, RegistryServer

pytest_plugins = ("tests.images",)

pytestmark = pytest.mark.root


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="berth-cri-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _start(base: Path, **section: object) -> daemons.Daemon:
    config = cri_config(base / "berth.toml", **section)
    return daemons.berthd(base / "d", "--config", str(config)).start()


@pytest.fixture
def mirrored(base: Path, registry: RegistryServer, busybox_oci: tuple[Path, Image]
             ) -> Iterator[tuple[daemons.Daemon, Image]]:
    """berthd whose CRI pulls docker.io through the local registry (hosts.toml)."""
    from tests.images import push_image

    _, img = busybox_oci
    push_image(registry, "library/busybox", "latest", img)
    certs = hosts_dir(base, "docker.io", registry.host)
    (base / "net.d").mkdir()
    d = _start(base, registry={"config_path": str(certs)},
               cni={"conf_dir": str(base / "net.d"), "bin_dir": "/usr/lib/cni"})
    try:
        yield d, img
    finally:
        d.stop()


def _code(excinfo: pytest.ExceptionInfo[GRPCError]) -> Status:
    return excinfo.value.status


def test_version_status_and_config_on_both_sockets(base: Path) -> None:
    d = _start(base, cni={"conf_dir": str(base / "missing")},
               stream_idle_timeout="1h", containerd={"no_pivot": True, "snapshotter":
                                                       "overlayfs"})
    try:
        for address in (d.state / "cri.sock", d.address):
            with CRIClient(address) as c:
                v = c.runtime("version", api.VersionRequest(version="v1"))
                assert (v.runtime_name, v.runtime_api_version) == ("berth", "v1")
                assert v.version == "0.1.0" and v.runtime_version
                st = c.runtime("status", api.StatusRequest(verbose=True))
                conds = {x.type: x for x in st.status.conditions}
                assert conds["RuntimeReady"].status is True
                net = conds["NetworkReady"]
                assert net.status is False and net.reason == "NetworkPluginNotReady"
                assert str(base / "missing") in net.message
                assert {h.name for h in st.runtime_handlers} == {"", "runc", "berth"}
                assert json.loads(st.info["config"])["snapshotter"] == "overlayfs"
                rc = c.runtime("runtime_config", api.RuntimeConfigRequest())
                assert rc.linux.cgroup_driver == api.CgroupDriver.CGROUPFS
                c.runtime("update_runtime_config", api.UpdateRuntimeConfigRequest(
                    runtime_config=api.RuntimeConfig(
                        network_config=api.NetworkConfig(pod_cidr="10.88.0.0/16"))))
        logs = d.logs()
        # Keys berth does not act on are named at start, never dropped silently.
        assert "CRI settings berth does not support are ignored" in logs
        assert "stream_idle_timeout" in logs and "containerd.no_pivot" in logs
    finally:
        d.stop()


def test_pull_list_status_remove_through_a_mirror(mirrored: tuple[daemons.Daemon, Image]
                                                  ) -> None:
    d, img = mirrored
    with CRIClient(d.state / "cri.sock") as c:
        r = c.image("pull_image", api.PullImageRequest(image=api.ImageSpec(image="busybox")))
        assert r.image_ref == img.config_digest
        # Per-blob progress, in berthd's durable event log.
        out = daemons.berth(d.address, "events", "--since", "0", "--no-follow", "--format",
                            "json", 'topic=="/images/pull/progress"', namespace="k8s.io").out
        progress = [json.loads(line) for line in out.splitlines() if line.strip()]
        layer = [p for p in progress if img.layer_digest in json.dumps(p)]
        assert "start" in json.dumps(layer) and "unpacked" in json.dumps(layer), progress
        listed = c.image("list_images", api.ListImagesRequest()).images
        assert [i.id for i in listed] == [img.config_digest]
        (image,) = listed
        assert image.repo_tags == ["docker.io/library/busybox:latest"]
        assert image.repo_digests == [f"docker.io/library/busybox@{img.manifest_digest}"]
        assert image.size == len(img.manifest) + len(img.config) + len(img.layer)
        for ref in ("busybox", "docker.io/library/busybox:latest", img.config_digest,
                    img.config_digest[7:19],
                    f"docker.io/library/busybox@{img.manifest_digest}"):
            st = c.image("image_status", api.ImageStatusRequest(
                image=api.ImageSpec(image=ref), verbose=True))
            assert st.image.id == img.config_digest, ref
        info = json.loads(st.info["info"])
        assert info["chainID"] == img.chain_id
        assert info["imageSpec"]["rootfs"]["diff_ids"] == [img.diff_id]
        # What the pull left is containerd's: three names, the layer unpacked.
        names = daemons.ctr_ok(d.address, "images", "ls", "-q", namespace="k8s.io").out.split()
        assert sorted(names) == sorted([
            "docker.io/library/busybox:latest", img.config_digest,
            f"docker.io/library/busybox@{img.manifest_digest}"])
        snaps = daemons.ctr_ok(d.address, "snapshots", "ls", namespace="k8s.io").out
        assert img.chain_id in snaps
        fs = c.image("image_fs_info", api.ImageFsInfoRequest()).image_filesystems
        assert fs[0].used_bytes.value > 0 and fs[0].inodes_used.value > 0
        assert fs[0].fs_id.mountpoint.endswith("io.containerd.snapshotter.v1.overlayfs")
        # Pulling again resolves again and changes nothing.
        again = c.image("pull_image", api.PullImageRequest(
            image=api.ImageSpec(image="docker.io/library/busybox:latest")))
        assert again.image_ref == img.config_digest
        c.image("remove_image", api.RemoveImageRequest(
            image=api.ImageSpec(image=img.config_digest)))
        assert c.image("list_images", api.ListImagesRequest()).images == []
        st = c.image("image_status", api.ImageStatusRequest(image=api.ImageSpec(image="busybox")))
        assert st.image is None or not st.image.id
        # Removing what is gone is no error (the kubelet retries).
        c.image("remove_image", api.RemoveImageRequest(image=api.ImageSpec(image="busybox")))
        assert daemons.ctr_ok(d.address, "images", "ls", "-q", namespace="k8s.io").out == ""


def test_bad_image_input_is_a_clear_error(mirrored: tuple[daemons.Daemon, Image]) -> None:
    d, _ = mirrored
    with CRIClient(d.state / "cri.sock") as c:
        for bad in ("UPPER/Case", "busybox@sha256:123", ""):
            with pytest.raises(GRPCError) as e:
                c.image("pull_image", api.PullImageRequest(image=api.ImageSpec(image=bad)))
            assert _code(e) == Status.INVALID_ARGUMENT, (bad, e.value.message)
        with pytest.raises(GRPCError) as e:
            c.image("pull_image", api.PullImageRequest(
                image=api.ImageSpec(image="library/missing:latest")))
        # The mirror says "not found"; the server (a closed local port) cannot answer,
        # so, as containerd's resolver, the pull fails as unavailable, naming both.
        message = e.value.message or ""
        assert _code(e) == Status.UNAVAILABLE and "missing:latest: not found" in message
        assert "127.0.0.1:1" in message
        with pytest.raises(GRPCError) as e:
            c.image("image_status", api.ImageStatusRequest(image=api.ImageSpec(image="A B")))
        assert _code(e) == Status.INVALID_ARGUMENT
        # Nothing half made: no image, no lease left by the failed pulls.
        assert c.image("list_images", api.ListImagesRequest()).images == []
        assert daemons.ctr_ok(d.address, "leases", "ls", "-q", namespace="k8s.io").out == ""
        assert c.runtime("version", api.VersionRequest()).runtime_name == "berth"


def test_pull_with_auth_config(base: Path, registry_auth: RegistryServer,
                               busybox_oci: tuple[Path, Image]) -> None:
    """A registry behind basic auth: the kubelet's AuthConfig (user and password, or the
    base64 ``auth`` form) is used; without it the pull is refused, clearly."""
    import base64

    from tests.images import push_image

    _, img = busybox_oci
    push_image(registry_auth, "busybox", "latest", img)
    host = registry_auth.host
    certs = base / "certs.d"
    (certs / host).mkdir(parents=True)
    (certs / host / "hosts.toml").write_text(f'server = "http://{host}"\n')
    d = _start(base, registry={"config_path": str(certs)})
    ref = f"{host}/busybox:latest"
    try:
        with CRIClient(d.state / "cri.sock") as c:
            with pytest.raises(GRPCError) as e:
                c.image("pull_image", api.PullImageRequest(image=api.ImageSpec(image=ref)))
            assert _code(e) in (Status.UNAUTHENTICATED, Status.UNAVAILABLE), e.value.message
            assert "401" in (e.value.message or "") or "nauthorized" in (e.value.message or "")
            wrong = api.AuthConfig(username="berth", password="nope")
            with pytest.raises(GRPCError):
                c.image("pull_image", api.PullImageRequest(image=api.ImageSpec(image=ref),
                                                           auth=wrong))
            user, password = registry_auth.credentials or ("", "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            for auth in (api.AuthConfig(username=user, password=password),
                         api.AuthConfig(auth=token)):
                r = c.image("pull_image", api.PullImageRequest(
                    image=api.ImageSpec(image=ref), auth=auth))
                assert r.image_ref == img.config_digest
            with pytest.raises(GRPCError) as e:
                c.image("pull_image", api.PullImageRequest(
                    image=api.ImageSpec(image=ref), auth=api.AuthConfig(auth="%%%")))
            assert _code(e) == Status.INVALID_ARGUMENT
    finally:
        d.stop()


def test_berth_images_pull_with_hosts_dir(base: Path, registry: RegistryServer,
                                          busybox_oci: tuple[Path, Image]) -> None:
    """``berth images pull --hosts-dir``: the same hosts.toml rules from the CLI (the
    mirror answers for docker.io; the server, a closed local port, is never needed)."""
    from tests.images import push_image

    _, img = busybox_oci
    push_image(registry, "library/busybox", "latest", img)
    certs = hosts_dir(base, "docker.io", registry.host)
    d = daemons.berthd(base / "d").start()
    try:
        r = daemons.berth(d.address, "images", "pull", "--hosts-dir", str(certs), "busybox")
        assert r.rc == 0, r.err
        assert img.manifest_digest in r.out
        bad = base / "bad.d"
        (bad / "docker.io").mkdir(parents=True)
        (bad / "docker.io" / "hosts.toml").write_text('server = [\n')
        r = daemons.berth(d.address, "images", "pull", "--hosts-dir", str(bad), "busybox")
        assert r.rc != 0 and "hosts.toml" in r.err, r.err
        push = daemons.berth(d.address, "images", "push", "--hosts-dir", str(certs),
                             "docker.io/library/busybox:latest")
        # The mirror may pull and resolve only; the server cannot be reached: refused.
        assert push.rc != 0 and "127.0.0.1:1" in push.err, push.err
    finally:
        d.stop()
