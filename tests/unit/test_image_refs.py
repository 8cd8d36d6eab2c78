"""Image references, platforms, chain IDs, Go-compatible JSON and GC labels."""

from __future__ import annotations

import hashlib
import json

import pytest

from berth.core import errdefs
from berth.core.gocompat import json as gojson
from berth.core.images import mediatypes, platforms, reference
from berth.core.images.image import append_source, child_labels, select_manifests
from berth.core.images.manifest import (
    Descriptor,
    Index,
    Manifest,
    chain_id,
    chain_ids,
    children,
    detect_media_type,
    parse_config,
    parse_index,
    parse_manifest,
)
from berth.core.images.platforms import Platform

# --- containerd's reference.Parse (cases from containerd's reference tests) -------------


@pytest.mark.parametrize(("text", "locator", "obj", "host"), [
    ("docker.io/library/redis:foo?fooo=asdf", "docker.io/library/redis", "foo", "docker.io"),
    ("docker.io/library/redis:foo@sha256:abcdef?fooo=asdf", "docker.io/library/redis",
     "foo@sha256:abcdef", "docker.io"),
    ("docker.io/library/redis@sha256:abcdef?fooo=asdf", "docker.io/library/redis",
     "@sha256:abcdef", "docker.io"),
    ("localhost:5000/library/redis:obj@abcdef?fooo=asdf", "localhost:5000/library/redis",
     "obj@abcdef", "localhost:5000"),
    ("docker.io/library/redis?fooo=asdf", "docker.io/library/redis", "", "docker.io"),
    ("sub-dom1.foo.com/bar/baz/quux:some-long-tag", "sub-dom1.foo.com/bar/baz/quux",
     "some-long-tag", "sub-dom1.foo.com"),
    ("b.gcr.io/test.example.com/my-app:test.example.com", "b.gcr.io/test.example.com/my-app",
     "test.example.com", "b.gcr.io"),
    ("127.0.0.1:5000/busybox:latest", "127.0.0.1:5000/busybox", "latest", "127.0.0.1:5000"),
])
def test_parse_spec(text: str, locator: str, obj: str, host: str) -> None:
    spec = reference.parse(text)
    assert (spec.locator, spec.object, spec.hostname) == (locator, obj, host)


def test_spec_parts_and_string() -> None:
    spec = reference.parse("127.0.0.1:5000/a/b:v1@sha256:" + "0" * 64)
    assert spec.repository == "a/b"
    assert spec.tag == "v1"
    assert spec.digest == "sha256:" + "0" * 64
    assert str(spec) == "127.0.0.1:5000/a/b:v1@sha256:" + "0" * 64
    assert str(reference.parse("h/r@sha256:abc")) == "h/r@sha256:abc"
    assert reference.parse("h/r@sha256:abc").tag == ""


@pytest.mark.parametrize("bad", ["/docker.io/library/redis", "http://host/x", ":5000/x"])
def test_parse_rejects(bad: str) -> None:
    with pytest.raises(errdefs.InvalidArgument):
        reference.parse(bad)


# --- Docker normalisation ------------------------------------------------------------------


@pytest.mark.parametrize(("text", "full", "familiar"), [
    ("busybox", "docker.io/library/busybox:latest", "busybox:latest"),
    ("busybox:1.36", "docker.io/library/busybox:1.36", "busybox:1.36"),
    ("library/busybox", "docker.io/library/busybox:latest", "busybox:latest"),
    ("index.docker.io/library/busybox", "docker.io/library/busybox:latest", "busybox:latest"),
    ("foo/bar", "docker.io/foo/bar:latest", "foo/bar:latest"),
    ("docker.io/library/a/b", "docker.io/library/a/b:latest", "library/a/b:latest"),
    ("localhost/foo", "localhost/foo:latest", "localhost/foo:latest"),
    ("127.0.0.1:5000/busybox", "127.0.0.1:5000/busybox:latest",
     "127.0.0.1:5000/busybox:latest"),
    ("ghcr.io/org/img:v2", "ghcr.io/org/img:v2", "ghcr.io/org/img:v2"),
])
def test_normalize_and_familiar(text: str, full: str, familiar: str) -> None:
    assert reference.normalize(text) == full
    assert reference.familiar(full) == familiar


def test_docker_ref_drops_tag_with_digest() -> None:
    d = "sha256:" + "ab" * 32
    assert reference.normalize(f"busybox:1@{d}") == f"docker.io/library/busybox@{d}"
    assert reference.normalize(f"busybox@{d}") == f"docker.io/library/busybox@{d}"


@pytest.mark.parametrize("bad", ["Busybox", "busybox:", "a" * 64, "foo//bar", "-x"])
def test_normalize_rejects(bad: str) -> None:
    with pytest.raises(errdefs.InvalidArgument):
        reference.normalize(bad)


def test_uppercase_domain_is_a_domain() -> None:
    # An uppercase first component can only be a host (repositories are lowercase).
    assert reference.normalize("Example.COM/x") == "Example.COM/x:latest"


def test_oci_ref_name() -> None:
    assert reference.oci_ref_name("docker.io/library/busybox:latest") == "latest"
    assert reference.oci_ref_name("docker.io/library/busybox@sha256:ab") == "@sha256:ab"
    assert reference.oci_ref_name("not a ref") == "not a ref"


# --- platforms -----------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "want"), [
    ("linux/amd64", Platform("linux", "amd64")),
    ("linux/x86_64", Platform("linux", "amd64")),
    ("linux/arm64", Platform("linux", "arm64")),
    ("linux/arm64/v8", Platform("linux", "arm64", "v8")),
    ("linux/aarch64", Platform("linux", "arm64")),
    ("linux/arm", Platform("linux", "arm")),
    ("linux/arm/7", Platform("linux", "arm", "v7")),
    ("linux/armhf", Platform("linux", "arm")),
    ("linux/armel", Platform("linux", "arm", "v6")),
    ("linux/i386", Platform("linux", "386")),
    ("windows/amd64", Platform("windows", "amd64")),
    ("macos/arm64", Platform("darwin", "arm64")),
])
def test_platform_parse(spec: str, want: Platform) -> None:
    assert platforms.parse(spec) == want


def test_platform_parse_errors() -> None:
    for bad in ("linux/*", "linux/amd 64", "a/b/c/d", "nosuchthing"):
        with pytest.raises(errdefs.InvalidArgument):
            platforms.parse(bad)


def test_only_amd64_accepts_older_levels_and_386_in_order() -> None:
    m = platforms.only(Platform("linux", "amd64", "v3"))
    assert m.match(Platform("linux", "amd64", "v3"))
    assert m.match(Platform("linux", "amd64", "v2"))
    assert m.match(Platform("linux", "amd64"))
    assert m.match(Platform("linux", "386"))
    assert not m.match(Platform("linux", "arm64"))
    assert not m.match(Platform("windows", "amd64", "v3"))
    assert m.less(Platform("linux", "amd64", "v2"), Platform("linux", "386"))
    assert not m.less(Platform("linux", "386"), Platform("linux", "amd64"))


def test_only_arm64_falls_back_to_arm() -> None:
    m = platforms.only(Platform("linux", "arm64"))
    assert m.match(Platform("linux", "arm", "v7"))
    assert m.match(Platform("linux", "arm", "v5"))
    assert not m.match(Platform("linux", "arm", "v4"))
    strict = platforms.only_strict(Platform("linux", "arm64"))
    assert not strict.match(Platform("linux", "arm", "v7"))
    assert strict.match(Platform("linux", "aarch64", "v8"))


def test_select_manifests_picks_best_stable() -> None:
    def d(n: int, p: Platform | None) -> Descriptor:
        return Descriptor(mediatypes.OCI_MANIFEST, f"sha256:{n:064x}", 1, platform=p)

    kids = [d(1, Platform("linux", "arm64")), d(2, Platform("linux", "386")),
            d(3, Platform("linux", "amd64")), d(4, None), d(5, Platform("linux", "amd64"))]
    m = platforms.only(Platform("linux", "amd64"))
    got = select_manifests(kids, m)
    assert [x.digest[-1] for x in got] == ["3", "5", "2", "4"]
    assert select_manifests(kids, m, limit=1)[0].digest.endswith("3")
    with pytest.raises(errdefs.NotFound):
        select_manifests(kids[:1], m, limit=1)


# --- identities and documents --------------------------------------------------------------


def _sha(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def test_chain_ids() -> None:
    a, b, c = _sha("a"), _sha("b"), _sha("c")
    ab = _sha(f"{a} {b}")
    assert chain_ids([a, b, c]) == [a, ab, _sha(f"{ab} {c}")]
    assert chain_id([a]) == a
    assert chain_id([]) == ""


def test_gojson_matches_go_encoding() -> None:
    doc = {"b": "<a&b>", "a": gojson.Map({"z": 1, "y": "\u2028é"}), "c": [True, None, 1.5]}
    assert gojson.marshal(doc) == (
        '{"b":"\\u003ca\\u0026b\\u003e","a":{"y":"\\u2028é","z":1},'
        '"c":[true,null,1.5]}').encode()
    # Control characters: \n \r \t short, the rest \u00XX; a literal backslash-b stays.
    assert gojson.marshal("\b\f\n\\b") == b'"\\u0008\\u000c\\n\\\\b"'


def test_index_bytes_as_containerd_writes_them() -> None:
    # The index containerd's importer writes for a docker-archive (field order, sorted
    # annotations, no mediaType on the index itself).
    m = Descriptor(mediatypes.DOCKER_MANIFEST, "sha256:" + "1" * 64, 427,
                   annotations={"org.opencontainers.image.ref.name": "latest",
                                "io.containerd.image.name": "docker.io/library/busybox:latest"},
                   platform=Platform("linux", "amd64"))
    assert Index([m]).encode() == (
        '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.docker.distribution.'
        'manifest.v2+json","digest":"sha256:' + "1" * 64 + '","size":427,"annotations":'
        '{"io.containerd.image.name":"docker.io/library/busybox:latest",'
        '"org.opencontainers.image.ref.name":"latest"},"platform":{"architecture":"amd64",'
        '"os":"linux"}}]}').encode()


def test_manifest_round_trip_and_children() -> None:
    config = Descriptor(mediatypes.OCI_CONFIG, "sha256:" + "c" * 64, 10)
    layers = [Descriptor(mediatypes.OCI_LAYER_GZIP, f"sha256:{i:064x}", i) for i in (1, 2)]
    data = Manifest(config, layers).encode()
    desc = Descriptor(mediatypes.OCI_MANIFEST, "sha256:" + "d" * 64, len(data))
    assert [c.digest for c in children(desc, data)] == [config.digest] + [x.digest
                                                                            for x in layers]
    m = parse_manifest(data)
    assert m.config.media_type == mediatypes.OCI_CONFIG and len(m.layers) == 2
    assert detect_media_type(data) == mediatypes.OCI_MANIFEST
    with pytest.raises(errdefs.InvalidArgument):
        parse_index(data)
    idx = Index([desc]).encode()
    assert detect_media_type(idx) == mediatypes.OCI_INDEX
    with pytest.raises(errdefs.InvalidArgument):
        parse_manifest(idx)
    with pytest.raises(errdefs.InvalidArgument):
        parse_manifest(b"[1]")


def test_parse_config_diff_ids() -> None:
    cfg = parse_config(json.dumps({"os": "linux", "architecture": "arm64", "variant": "v8",
                                   "rootfs": {"type": "layers", "diff_ids": ["sha256:a"]}})
                       .encode())
    assert cfg.diff_ids == ["sha256:a"]
    assert cfg.platform == Platform("linux", "arm64")
    with pytest.raises(errdefs.InvalidArgument):
        parse_config(b'{"rootfs": {"diff_ids": [1]}}')


# --- labels and ingest refs ----------------------------------------------------------------


def test_child_gc_labels_like_containerd() -> None:
    kids = [
        Descriptor(mediatypes.DOCKER_CONFIG, "sha256:c", 1),
        Descriptor(mediatypes.DOCKER_LAYER_GZIP, "sha256:l0", 1),
        Descriptor(mediatypes.OCI_LAYER, "sha256:l1", 1),
        Descriptor(mediatypes.OCI_MANIFEST, "sha256:m0", 1),
        Descriptor("application/x-unknown", "sha256:u0", 1),
        Descriptor("application/x-unknown", "sha256:u1", 1),
    ]
    assert child_labels(kids) == {
        "containerd.io/gc.ref.content.config": "sha256:c",
        "containerd.io/gc.ref.content.l.0": "sha256:l0",
        "containerd.io/gc.ref.content.l.1": "sha256:l1",
        "containerd.io/gc.ref.content.m.0": "sha256:m0",
        "containerd.io/gc.ref.content.0": "sha256:u0",
        "containerd.io/gc.ref.content.1": "sha256:u1",
    }


def test_ref_keys_like_containerd() -> None:
    d = "sha256:" + "a" * 64
    assert mediatypes.ref_key(mediatypes.OCI_LAYER_GZIP, d) == f"layer-{d}"
    assert mediatypes.ref_key(mediatypes.DOCKER_MANIFEST_LIST, d) == f"index-{d}"
    assert mediatypes.ref_key(mediatypes.DOCKER_CONFIG, d) == f"config-{d}"
    assert mediatypes.ref_key(mediatypes.OCI_MANIFEST, d,
                              {mediatypes.ANNOTATION_REF_NAME: "v1"}) == f"manifest-v1@{d}"
    assert mediatypes.ref_key("text/plain", d) == f"unknown-{d}"


def test_distribution_source_values() -> None:
    assert append_source("", "busybox") == "busybox"
    assert append_source("busybox", "busybox") == "busybox"
    assert append_source("a,b", "c") == "a,b,c"
