"""The image store: containerd's validation, update masks, filters and ordering."""

from __future__ import annotations

from pathlib import Path

import pytest

from berth.core import errdefs
from berth.core.content import digest as dg
from berth.core.metadata.db import Database
from berth.core.metadata.images import Descriptor, Image, ImageStore
from berth.core.metadata.namespaces import NamespaceStore

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
D1, D2 = dg.from_string("one"), dg.from_string("two")


@pytest.fixture
def db(tmp_path: Path) -> Database:
    d = Database(tmp_path / "meta.db")
    yield d
    d.close()


def img(name: str, digest: str = D1, *, media: str = MANIFEST, size: int = 10,
        labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None
        ) -> Image:
    return Image(name, Descriptor(media, digest, size, annotations=annotations or {}), labels or {})


def test_create_get_and_duplicate(db: Database) -> None:
    changes: list[bool] = []
    store = ImageStore(db, mutated=changes.append)
    created = store.create("ns", img("docker.io/library/a:1", labels={"k": "v", "empty": ""}))
    assert created.labels == {"k": "v"}  # empty values are not stored, as in bolt
    assert created.created_at == created.updated_at
    got = store.get("ns", "docker.io/library/a:1")
    assert got == created
    with pytest.raises(errdefs.AlreadyExists, match='^image "docker.io/library/a:1": already'):
        store.create("ns", img("docker.io/library/a:1"))
    with pytest.raises(errdefs.NotFound, match='^image "a:1": not found$'):
        store.get("other", "a:1")
    assert changes == [False]


@pytest.mark.parametrize(("image", "message"), [
    (img(""), "image name must not be empty: invalid argument"),
    (img("x", ""), 'Target.Digest "" invalid: invalid checksum digest format: invalid argument'),
    (img("x", "sha256:abc"),
     'Target.Digest "sha256:abc" invalid: invalid checksum digest length: invalid argument'),
    (img("x", "md5:" + "0" * 32),
     'Target.Digest "md5:' + "0" * 32 + '" invalid: unsupported digest algorithm: invalid arg'),
    (img("x", size=0), "Target.Size must be greater than zero: invalid argument"),
    (img("x", media=""), "Target.MediaType must be set: invalid argument"),
    (img("x", labels={"k": "v" * 4096}),
     "image.Labels: label key and value greater than maximum size (4096 bytes), key: k: "),
])
def test_validation_messages(db: Database, image: Image, message: str) -> None:
    with pytest.raises(errdefs.InvalidArgument) as e:
        ImageStore(db).create("ns", image)
    assert str(e.value).startswith(message)


def test_list_is_in_byte_order_and_filters(db: Database) -> None:
    store = ImageStore(db)
    store.create("ns", img("b", D2, media=INDEX, labels={"tier": "web"},
                           annotations={"org.opencontainers.image.ref.name": "1"}))
    store.create("ns", img("B", D1))
    store.create("ns", img("a", D1, labels={"tier": "db"}))
    store.create("other", img("z"))
    assert [i.name for i in store.list("ns")] == ["B", "a", "b"]
    names = lambda *f: [i.name for i in store.list("ns", f)]  # noqa: E731
    assert names("name==a") == ["a"]
    assert names(f"target.digest=={D2}") == ["b"]
    assert names(f'target.mediatype=="{INDEX}"') == ["b"]
    assert names("labels.tier") == ["a", "b"]
    assert names("labels.tier==web", "name==B") == ["B", "b"]
    assert names('annotations."org.opencontainers.image.ref.name"==1') == ["b"]
    assert names("target") == []
    with pytest.raises(errdefs.InvalidArgument, match="invalid argument: invalid argument$"):
        store.list("ns", ["name=="])


def test_update_with_field_masks(db: Database) -> None:
    store = ImageStore(db)
    before = store.create("ns", img("x", labels={"a": "1", "b": "2"},
                                    annotations={"an": "1"}))
    # One label set, one cleared; the rest untouched.
    u = store.update("ns", Image("x", labels={"a": "9"}), ["labels.a", "labels.b"])
    assert u.labels == {"a": "9"} and u.target.digest == D1
    assert u.created_at == before.created_at and u.updated_at >= before.updated_at
    u = store.update("ns", Image("x", labels={"c": "3"}), ["labels"])
    assert u.labels == {"c": "3"}
    u = store.update("ns", img("x", annotations={"new": "1"}), ["annotations.new"])
    assert u.target.annotations == {"an": "1", "new": "1"}
    u = store.update("ns", img("x", annotations={"only": "1"}), ["annotations"])
    assert u.target.annotations == {"only": "1"}
    u = store.update("ns", img("x", D2, media=INDEX, size=5), ["target"])
    assert (u.target.digest, u.target.media_type, u.target.size) == (D2, INDEX, 5)
    assert u.target.annotations == {} and u.labels == {"c": "3"}
    assert store.get("ns", "x") == u
    with pytest.raises(errdefs.InvalidArgument,
                       match='^cannot update "name" field on image "x": invalid argument$'):
        store.update("ns", img("x"), ["name"])
    with pytest.raises(errdefs.InvalidArgument, match='^Target.Digest "" invalid'):
        store.update("ns", Image("x"), ["target"])
    with pytest.raises(errdefs.InvalidArgument, match="^Target.Size must be greater"):
        store.update("ns", img("x", size=0), ["target"])
    # No mask: everything is replaced by what was sent.
    u = store.update("ns", img("x", D1, labels={"all": "new"}))
    assert u.labels == {"all": "new"} and u.target.digest == D1
    with pytest.raises(errdefs.NotFound, match='^image "y": not found$'):
        store.update("ns", img("y"))
    with pytest.raises(errdefs.InvalidArgument, match="^image name is required for update"):
        store.update("ns", img(""))


def test_delete_and_namespace_emptiness(db: Database) -> None:
    changes: list[bool] = []
    store = ImageStore(db, mutated=changes.append)
    namespaces = NamespaceStore(db)
    store.create("ns", img("x"))
    with pytest.raises(errdefs.FailedPrecondition,
                       match='namespace "ns" must be empty, but it still has images'):
        namespaces.delete("ns")
    store.delete("ns", "x")
    with pytest.raises(errdefs.NotFound, match='^image "x": not found$'):
        store.delete("ns", "x")
    assert changes == [False, True]
    namespaces.delete("ns")
    assert namespaces.list() == []


def test_kept_get_answers_follow_the_store(db: Database) -> None:
    # The images service keeps Get answers serialized, made from the image it reads at
    # each call: an update, a delete and a new image under the same name are all seen.
    from berth.core.api.containerd.services.images import v1 as api
    from berth.core.grpc.context import CallContext
    from berth.core.services.images import ImagesLocal

    store = ImageStore(db)
    local = ImagesLocal(store, events=None, gc=None)  # type: ignore[arg-type]  # Get uses neither
    ctx = CallContext(metadata={"containerd-namespace": "ns"})

    def get() -> api.Image:
        return local.get(ctx, api.GetImageRequest(name="a")).message.image

    store.create("ns", img("a", labels={"k": "v"}))
    first = get()
    assert (first.target.digest, first.labels) == (D1, {"k": "v"})
    assert get() == first
    store.update("ns", img("a", labels={"k": "w"}), ["labels.k"])
    assert get().labels == {"k": "w"}
    store.delete("ns", "a")
    with pytest.raises(errdefs.NotFound):
        get()
    store.create("ns", img("a", D2))
    assert get().target.digest == D2
