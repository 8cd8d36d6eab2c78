"""The namespaced content store as garbage collection and the Content API rely on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from berth.core import errdefs
from berth.core.content import ContentStore, digest as dg
from berth.core.metadata.content import Info, NamespacedContent, SharedExclusive
from berth.core.metadata.db import Database
from berth.core.metadata.leases import LeaseStore, Resource
from berth.core.metadata.namespaces import NamespaceStore


@pytest.fixture
def db(tmp_path: Path) -> Database:
    d = Database(tmp_path / "meta.db")
    yield d
    d.close()


@pytest.fixture
def backend(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "content")


async def put(cs: NamespacedContent, ns: str, ref: str, data: bytes, **kw: object) -> str:
    w = await cs.writer(ns, ref, **kw)  # type: ignore[arg-type]
    await w.write(data)
    return await w.commit(len(data))


async def test_blob_is_visible_only_where_committed(db: Database,
                                                     backend: ContentStore) -> None:
    changes: list[bool] = []
    cs = NamespacedContent(db, backend, mutated=changes.append)
    d = await put(cs, "a", "r", b"data")
    assert cs.info("a", d).size == 4
    with pytest.raises(errdefs.NotFound, match=f"^content digest {d}: not found$"):
        cs.info("b", d)
    with pytest.raises(errdefs.NotFound):
        cs.reader("b", d)
    async with cs.reader("a", d) as r:
        assert await r.read_at(0, 10) == b"data"
    # Writing the same bytes elsewhere records them there; a second commit in the same
    # namespace is AlreadyExists but still consumes the ingest.
    assert await put(cs, "b", "r", b"data") == d
    with pytest.raises(errdefs.AlreadyExists, match=f"^content {d}: already exists$"):
        await put(cs, "b", "r2", b"data")
    assert await cs.list_statuses("b") == []
    assert [i.digest for i in cs.list("b")] == [d]
    assert True not in changes


async def test_shared_import_by_digest_needs_no_bytes(db: Database,
                                                      backend: ContentStore) -> None:
    cs = NamespacedContent(db, backend)
    d = await put(cs, "a", "r", b"shared bytes")
    w = await cs.writer("b", "imp", total=0, expected=d)
    st = w.status()
    assert (st.offset, st.total, st.expected) == (12, 12, d)
    assert w.digest() == d
    # Until committed it is not b's, and the record keeps the backend blob alive even if
    # its owner goes away.
    with pytest.raises(errdefs.NotFound):
        cs.info("b", d)
    await cs.gc_remove("a", d)
    assert backend.blob_path(d).exists()
    with pytest.raises(errdefs.FailedPrecondition, match='^"imp" failed size validation'):
        await w.commit(3)
    assert await w.commit(12, d) == d
    assert cs.info("b", d).size == 12


async def test_shared_writer_that_writes_anyway_appends(db: Database,
                                                        backend: ContentStore) -> None:
    cs = NamespacedContent(db, backend)
    d = await put(cs, "a", "r", b"abc")
    w = await cs.writer("b", "more", expected=d)
    await w.write(b"def")
    assert await w.commit() == dg.from_bytes(b"abcdef")
    w = await cs.writer("b", "restart", expected=d)
    await w.truncate(0)
    await w.write(b"xyz")
    assert await w.commit() == dg.from_bytes(b"xyz")


async def test_existing_expected_digest_refuses_but_joins_lease(
        db: Database, backend: ContentStore) -> None:
    cs = NamespacedContent(db, backend)
    leases = LeaseStore(db)
    d = await put(cs, "a", "r", b"x")
    leases.create("a", "l", {})
    with pytest.raises(errdefs.AlreadyExists, match=f"^content {d}: already exists$"):
        await cs.writer("a", "again", expected=d, lease="l")
    assert leases.list_resources("a", "l") == [Resource(id=d, type="content")]
    with pytest.raises(errdefs.NotFound, match="^lease does not exist: not found$"):
        await cs.writer("a", "other", lease="nope")
    with pytest.raises(errdefs.NotFound, match="^unable to lease content: lease does not"):
        await cs.writer("a", "again", expected=d, lease="nope")


async def test_leased_ingest_moves_to_content_on_commit(db: Database,
                                                       backend: ContentStore) -> None:
    cs = NamespacedContent(db, backend)
    leases = LeaseStore(db)
    leases.create("ns", "l", {})
    w = await cs.writer("ns", "ing", lease="l")
    await w.write(b"leased")
    assert leases.list_resources("ns", "l") == [Resource(id="ing", type="ingests")]
    d = await w.commit()
    assert leases.list_resources("ns", "l") == [Resource(id=d, type="content")]
    cs.delete("ns", d, lease="l")
    assert leases.list_resources("ns", "l") == []


async def test_same_ref_in_two_namespaces_are_separate_ingests(
        db: Database, backend: ContentStore) -> None:
    cs = NamespacedContent(db, backend)
    w1 = await cs.writer("a", "ref")
    w2 = await cs.writer("b", "ref")  # no lock conflict: different backend refs
    await w1.write(b"one")
    await w2.write(b"two two")
    await w1.close()
    await w2.close()
    assert [(s.ref, s.offset) for s in await cs.list_statuses("a")] == [("ref", 3)]
    assert (await cs.status("b", "ref")).offset == 7
    await cs.abort("a", "ref")
    with pytest.raises(errdefs.NotFound, match="^reference ref: not found$"):
        await cs.status("a", "ref")
    with pytest.raises(errdefs.NotFound, match="^reference ref: not found$"):
        await cs.abort("a", "ref")
    assert (await cs.status("b", "ref")).offset == 7
    assert [s.ref async for s in backend.list_statuses()] == ["b/2/ref"]


async def test_update_labels_and_namespace_emptiness(db: Database,
                                                     backend: ContentStore) -> None:
    cs = NamespacedContent(db, backend)
    d = await put(cs, "ns", "r", b"x")
    info = cs.update("ns", Info(d, labels={"a": "1", "b": "2"}), ["labels.a"])
    assert info.labels == {"a": "1"}
    info = cs.update("ns", Info(d, labels={"b": "2"}), [])
    assert info.labels == {"b": "2"} and info.updated_at >= info.created_at
    with pytest.raises(errdefs.InvalidArgument,
                       match=f'^cannot update "size" field on content info "{d}"'):
        cs.update("ns", Info(d), ["size"])
    with pytest.raises(errdefs.InvalidArgument, match="^info.Labels: label key and value"):
        cs.update("ns", Info(d, labels={"k": "v" * 5000}), ["labels.k"])
    assert [i.digest for i in cs.list("ns", ["labels.b==2"])] == [d]
    assert cs.list("ns", ["size==1"]) == []
    with pytest.raises(errdefs.FailedPrecondition, match="still has blobs"):
        NamespaceStore(db).delete("ns")


async def test_cleanup_spares_blobs_being_committed(autojump_clock: object) -> None:
    lock = SharedExclusive()
    order: list[str] = []

    async def commit() -> None:
        async with lock.shared():
            order.append("commit start")
            await trio.sleep(0.1)
            order.append("commit end")

    async def cleanup() -> None:
        await trio.sleep(0.01)
        async with lock.exclusive():
            order.append("cleanup")

    async with trio.open_nursery() as n:
        n.start_soon(commit)
        n.start_soon(cleanup)
    assert order == ["commit start", "commit end", "cleanup"]


async def test_content_read_answers_small_blobs_from_memory_per_namespace(
        db: Database, backend: ContentStore) -> None:
    from berth.core.api.containerd.services.content import v1 as api
    from berth.core.grpc.context import CallContext
    from berth.core.services.content import ContentService

    cs = NamespacedContent(db, backend)
    svc = ContentService(cs)
    d = await put(cs, "a", "r", b"manifest bytes")

    async def read(ns: str, **kw: int) -> list[tuple[int, bytes]]:
        got: list[tuple[int, bytes]] = []

        async def send(msg: object) -> None:
            m = getattr(msg, "message", msg)  # a kept answer travels as its bytes
            got.append((m.offset, m.data))

        await svc.read(CallContext(metadata={"containerd-namespace": ns}),
                       api.ReadContentRequest(digest=d, **kw), send)
        return got

    assert await read("a") == [(0, b"manifest bytes")]
    assert await read("a") == [(0, b"manifest bytes")]
    assert d in svc._reads
    # Ranges still read the file; offsets count from the start of the read.
    assert await read("a", offset=9) == [(0, b"bytes")]
    assert await read("a", offset=0, size=8) == [(0, b"manifest")]
    assert await read("a", size=100) == [(0, b"manifest bytes")]
    # Kept bytes are no permission: another namespace, or a deleted blob, is NotFound.
    with pytest.raises(errdefs.NotFound):
        await read("b")
    cs.delete("a", d)
    with pytest.raises(errdefs.NotFound):
        await read("a")


async def test_content_info_answer_is_kept_until_the_blob_changes(
        db: Database, backend: ContentStore) -> None:
    from berth.core.api.containerd.services.content import v1 as api
    from berth.core.grpc.context import CallContext
    from berth.core.services.content import ContentService

    cs = NamespacedContent(db, backend)
    svc = ContentService(cs)
    d = await put(cs, "a", "r", b"config")
    cs.update("a", Info(digest=d, labels={"k": "1"}), ["labels.k"])
    ctx = CallContext(metadata={"containerd-namespace": "a"})
    first = svc.info(ctx, api.InfoRequest(digest=d))
    assert svc.info(ctx, api.InfoRequest(digest=d)) is first
    assert first.message.info.labels == {"k": "1"} and first.message.info.size == 6
    cs.update("a", Info(digest=d, labels={"k": "2"}), ["labels.k"])
    second = svc.info(ctx, api.InfoRequest(digest=d))
    assert second is not first and second.message.info.labels == {"k": "2"}
    assert second.message.info.updated_at >= first.message.info.updated_at
    with pytest.raises(errdefs.NotFound):
        svc.info(CallContext(metadata={"containerd-namespace": "b"}), api.InfoRequest(digest=d))
