"""OCI and Docker schema 2 media types, and the labels and annotations images use."""

from __future__ import annotations

from berth.core.archive.compression import is_layer_media_type

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
# Old Docker schema 1 (signed) manifests: recognised, not converted.
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"

INDEXES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFESTS = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIGS = frozenset({OCI_CONFIG, DOCKER_CONFIG})

# What a registry is asked for when resolving a reference (containerd's order).
MANIFEST_ACCEPT = (DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX, "*/*")

# Labels (containerd's names, so GC and other clients understand them).
LABEL_UNCOMPRESSED = "containerd.io/uncompressed"
LABEL_DISTRIBUTION_SOURCE = "containerd.io/distribution.source"
LABEL_GC_REF_CONTENT = "containerd.io/gc.ref.content"
LABEL_GC_REF_SNAPSHOT = "containerd.io/gc.ref.snapshot"
LABEL_GC_EXPIRE = "containerd.io/gc.expire"
LABEL_SNAPSHOT_REF = "containerd.io/snapshot.ref"

# Annotations.
ANNOTATION_IMAGE_NAME = "io.containerd.image.name"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"


def is_index(media_type: str) -> bool:
    return media_type in INDEXES


def is_manifest(media_type: str) -> bool:
    return media_type in MANIFESTS


def is_config(media_type: str) -> bool:
    return media_type in CONFIGS


def is_layer(media_type: str) -> bool:
    """containerd's IsLayerType (any OCI layer type, the Docker ones with a suffix)."""
    if media_type.startswith("application/vnd.oci.image.layer."):
        return True
    base = media_type.split("+", 1)[0]
    return base in _DOCKER_LAYERS or is_layer_media_type(media_type)


_DOCKER_LAYERS = frozenset({DOCKER_LAYER, DOCKER_LAYER_GZIP, DOCKER_FOREIGN_LAYER_GZIP,
                            "application/vnd.docker.image.rootfs.foreign.diff.tar"})


def is_non_distributable(media_type: str) -> bool:
    return "nondistributable" in media_type or "foreign" in media_type


def child_gc_label(media_type: str) -> str:
    """containerd's ChildGCLabels: the label prefix a parent uses to keep a child."""
    if is_config(media_type):
        return "containerd.io/gc.ref.content.config"
    if is_manifest(media_type):
        return "containerd.io/gc.ref.content.m."
    if is_layer(media_type):
        return "containerd.io/gc.ref.content.l."
    return "containerd.io/gc.ref.content."


def ref_key(media_type: str, digest: str, annotations: dict[str, str] | None = None) -> str:
    """containerd's remotes.MakeRefKey: the ingest ref of a fetch (same for a re-run,
    which then resumes where the last one stopped)."""
    key = digest
    if annotations and ANNOTATION_REF_NAME in annotations:
        key = f"{annotations[ANNOTATION_REF_NAME]}@{digest}"
    if is_manifest(media_type):
        return f"manifest-{key}"
    if is_index(media_type):
        return f"index-{key}"
    if is_layer(media_type):
        return f"layer-{key}"
    if is_config(media_type):
        return f"config-{key}"
    return f"unknown-{key}"
