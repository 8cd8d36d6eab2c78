"""Local content store: blobs, ingests, verification, resume, locking, path safety."""

from __future__ import annotations

import hashlib
import os
import stat
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from berth.core.content import ContentStore, OutOfRange, digest as dg, ingest
from berth.core.errdefs import (
    AlreadyExists,
    Code,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    to_status,
)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "blobs").rglob("*") if p.is_file())


def ingest_dirs(root: Path) -> list[Path]:
    return sorted(p for p in (root / "ingest").iterdir())


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "content"


@pytest.fixture
def store(root: Path) -> ContentStore:
    return ContentStore(root, lock_wait=0)


async def put(store: ContentStore, data: bytes, ref: str = "ref") -> str:
    w = await store.writer(ref, total=len(data), expected=sha256(data))
    await w.write(data)
    return await w.commit(len(data), sha256(data))


# --- digests -----------------------------------------------------------------------

@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("sha256", dg.ERR_FORMAT),
        ("sha256:", dg.ERR_FORMAT),
        (":abc", dg.ERR_FORMAT),
        ("sha256:abc", dg.ERR_LENGTH),
        ("sha256:" + "A" * 64, dg.ERR_FORMAT),
        ("sha256:" + "g" * 64, dg.ERR_FORMAT),
        ("sha512:" + "a" * 64, dg.ERR_LENGTH),
        ("md5:" + "a" * 32, dg.ERR_UNSUPPORTED),
        ("MD5:abc", dg.ERR_FORMAT),
        ("sha256:../../../etc/passwd", dg.ERR_LENGTH),  # go-digest checks length first
        ("sha256:" + "../" * 21 + "x", dg.ERR_FORMAT),
    ],
)
def test_bad_digests_are_invalid_argument(value: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        dg.parse(value)
    assert str(exc.value) == f"{value}: {reason}: invalid argument"


def test_good_digests_parse() -> None:
    d = dg.parse(sha256(b"x"))
    assert (d.algorithm, d.hex) == ("sha256", hashlib.sha256(b"x").hexdigest())
    d512 = dg.from_bytes(b"x", "sha512")
    assert d512 == "sha512:" + hashlib.sha512(b"x").hexdigest()
    assert dg.parse(str(d512)).algorithm == "sha512"


async def test_store_rejects_invalid_digests(store: ContentStore) -> None:
    for call in (store.info("sha256:nope"), store.delete("sha256:nope"),
                 store.read_at("nope", 0, 1), store.writer("r", expected="sha256:x")):
        with pytest.raises(InvalidArgument):
            await call
    w = await store.writer("r")
    await w.write(b"data")
    with pytest.raises(InvalidArgument):
        await w.commit(4, "sha256:zz")
    # The bad commit closed the writer but kept the ingest.
    assert w.closed
    assert (await store.status("r")).offset == 4
    assert blob_files(store.root) == []


# --- write, commit, read -----------------------------------------------------------

async def test_write_commit_info_read(store: ContentStore, root: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 123)  # crosses the write buffer several times
    w = await store.writer("layer-1", total=len(data))
    assert w.offset == 0
    for i in range(0, len(data), 10_000):
        await w.write(data[i:i + 10_000])
    assert w.offset == len(data)
    assert w.digest() == sha256(data)
    d = await w.commit(len(data), sha256(data))
    assert d == sha256(data)
    assert w.closed

    path = root / "blobs" / "sha256" / hashlib.sha256(data).hexdigest()
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) & 0o222 == 0  # read-only once committed
    assert ingest_dirs(root) == []

    info = await store.info(d)
    assert (info.digest, info.size) == (d, len(data))
    assert info.created_at.timestamp() == pytest.approx(path.stat().st_mtime)
    with pytest.raises(NotFound):
        await store.status("layer-1")


async def test_commit_without_expectations_uses_sha256(store: ContentStore) -> None:
    w = await store.writer("anything")
    await w.write(b"abc")
    assert await w.commit() == sha256(b"abc")


async def test_empty_blob(store: ContentStore) -> None:
    w = await store.writer("empty")
    d = await w.commit(0, sha256(b""))
    assert (await store.info(d)).size == 0
    assert await store.read_at(d, 0, 10) == b""


async def test_sha512_blob(store: ContentStore, root: Path) -> None:
    data = b"x" * 5000
    want = "sha512:" + hashlib.sha512(data).hexdigest()
    w = await store.writer("s512", expected=want)
    await w.write(data)
    assert w.digest() == want
    assert await w.commit(len(data)) == want  # expected taken from the writer
    assert (root / "blobs" / "sha512" / hashlib.sha512(data).hexdigest()).read_bytes() == data
    # An algorithm only named at commit time still verifies (one extra pass).
    w = await store.writer("late")
    await w.write(b"late")
    with pytest.raises(FailedPrecondition, match="unexpected commit digest sha512:"):
        await w.commit(4, "sha512:" + "0" * 128)
    w = await store.writer("late")
    assert await w.commit(4, dg.from_bytes(b"late", "sha512")) == dg.from_bytes(b"late",
                                                                                "sha512")


async def test_read_ranges(store: ContentStore) -> None:
    data = bytes(range(256)) * 1024  # 256 KiB: inline and threaded reads
    d = await put(store, data)
    assert await store.read_at(d, 0, len(data)) == data
    assert await store.read_at(d, 10, 5) == data[10:15]
    assert await store.read_at(d, 100_000, 200_000) == data[100_000:300_000]
    assert await store.read_at(d, len(data) - 3, 100) == data[-3:]
    assert await store.read_at(d, len(data) + 5, 10) == b""
    with pytest.raises(InvalidArgument):
        await store.read_at(d, -1, 10)

    async with store.reader(d) as r:
        assert r.size == len(data)
        got = [c async for c in r.chunks(1000, 0, chunk_size=70_000)]
        assert b"".join(got) == data[1000:]
        assert [len(c) for c in got[:-1]] == [70_000] * (len(got) - 1)
        assert b"".join([c async for c in r.chunks(-5, 10)]) == data[:10]
        assert b"".join([c async for c in r.chunks(5, 10**9)]) == data[5:]
        assert [c async for c in r.chunks(len(data))] == []
        with pytest.raises(OutOfRange) as exc:
            [c async for c in r.chunks(len(data) + 1)]
        assert str(exc.value) == f"read past object length {len(data)} bytes"
        assert to_status(exc.value)[0] == Code.OUT_OF_RANGE

    with pytest.raises(NotFound) as exc:
        async with store.reader(sha256(b"missing")):
            pass
    assert str(exc.value) == f"content {sha256(b'missing')}: not found"


async def test_open_reader_survives_delete(store: ContentStore) -> None:
    data = b"still here" * 1000
    d = await put(store, data)
    async with store.reader(d) as r:
        await store.delete(d)
        assert await r.read_at(0, len(data)) == data


async def test_info_and_delete(store: ContentStore, root: Path) -> None:
    d = await put(store, b"delete me")
    await store.delete(d)
    assert blob_files(root) == []
    with pytest.raises(NotFound) as exc:
        await store.info(d)
    assert str(exc.value) == f"content {d}: not found"
    with pytest.raises(NotFound):
        await store.delete(d)


async def test_walk(store: ContentStore, root: Path) -> None:
    assert [i async for i in store.walk()] == []
    a = await put(store, b"a", "ra")
    b = await put(store, b"bb", "rb")
    w = await store.writer("rc")
    await w.write(b"ccc")
    c = await w.commit(3, dg.from_bytes(b"ccc", "sha512"))
    # Junk the walk must not report as blobs.
    (root / "blobs" / "sha256" / "not-a-digest").write_bytes(b"junk")
    (root / "blobs" / "md5").mkdir()
    (root / "blobs" / "md5" / ("0" * 32)).write_bytes(b"junk")
    found = {i.digest: i.size async for i in store.walk()}
    assert found == {a: 1, b: 2, c: 3}


# --- verification ------------------------------------------------------------------

async def test_wrong_digest_commits_nothing(store: ContentStore, root: Path) -> None:
    w = await store.writer("bad")
    await w.write(b"payload")
    wrong = sha256(b"something else")
    with pytest.raises(FailedPrecondition) as exc:
        await w.commit(7, wrong)
    assert str(exc.value) == (
        f"unexpected commit digest {sha256(b'payload')}, expected {wrong}: failed precondition")
    assert w.closed
    assert blob_files(root) == []
    # The ingest stays, so the client can resume, restart or abort it.
    st = await store.status("bad")
    assert st.offset == 7
    w = await store.writer("bad")
    assert w.offset == 7
    await w.close()


async def test_wrong_size_commits_nothing(store: ContentStore, root: Path) -> None:
    w = await store.writer("short")
    await w.write(b"12345")
    with pytest.raises(FailedPrecondition) as exc:
        await w.commit(6, sha256(b"12345"))
    assert str(exc.value) == "unexpected commit size 5, expected 6: failed precondition"
    assert blob_files(root) == []
    assert (await store.status("short")).offset == 5


async def test_total_from_writer_is_checked(store: ContentStore) -> None:
    w = await store.writer("t", total=10)
    await w.write(b"123")
    with pytest.raises(FailedPrecondition, match="unexpected commit size 3, expected 10"):
        await w.commit()


async def test_commit_of_existing_blob(store: ContentStore, root: Path) -> None:
    d = await put(store, b"same", "first")
    w = await store.writer("second")
    await w.write(b"same")
    with pytest.raises(AlreadyExists) as exc:
        await w.commit(4, d)
    assert str(exc.value) == f"content {d}: already exists"
    assert w.closed
    with pytest.raises(NotFound):
        await store.status("second")  # the ingest is discarded
    assert ingest_dirs(root) == []
    assert await store.read_at(d, 0, 4) == b"same"
    # Declaring the digest up front fails before anything is written.
    with pytest.raises(AlreadyExists):
        await store.writer("third", expected=d)
    assert ingest_dirs(root) == []


async def test_closed_writer_cannot_commit(store: ContentStore) -> None:
    w = await store.writer("c")
    await w.close()
    await w.close()  # idempotent
    with pytest.raises(FailedPrecondition) as exc:
        await w.commit()
    assert str(exc.value) == "cannot commit on closed writer: failed precondition"
    with pytest.raises(FailedPrecondition):
        await w.write(b"x")


# --- offsets -----------------------------------------------------------------------

async def test_write_offsets(store: ContentStore) -> None:
    w = await store.writer("off")
    await w.write(b"abc", offset=0)
    await w.write(b"def", offset=3)
    with pytest.raises(OutOfRange) as exc:
        await w.write(b"x", offset=10)
    assert str(exc.value) == "write @10 must occur at current offset 6"
    with pytest.raises(OutOfRange):
        await w.write(b"x", offset=2)  # only the current offset or 0
    # Offset 0 restarts the ingest and its digest.
    await w.write(b"new", offset=0)
    assert w.offset == 3
    assert await w.commit(3, sha256(b"new")) == sha256(b"new")


async def test_truncate_after_flush(store: ContentStore) -> None:
    big = os.urandom(2 << 20)
    w = await store.writer("tr")
    await w.write(big)
    await w.truncate(0)
    assert w.offset == 0
    await w.write(b"small")
    assert await w.commit(5, sha256(b"small")) == sha256(b"small")


# --- resume ------------------------------------------------------------------------

async def test_resume_after_close(store: ContentStore) -> None:
    data = os.urandom((1 << 20) + 4321)
    w = await store.writer("resume", total=len(data), expected=sha256(data))
    await w.write(data[:700_000])
    await w.write(data[700_000:800_000])
    await w.close()

    st = await store.status("resume")
    assert (st.offset, st.total, st.expected) == (800_000, len(data), sha256(data))

    w = await store.writer("resume")
    assert (w.offset, w.total, w.expected) == (800_000, len(data), sha256(data))
    assert not w.rehashed  # same process, file untouched: hash state reused
    await w.write(data[800_000:], offset=800_000)
    assert await w.commit() == sha256(data)


async def test_resume_after_restart_rehashes(root: Path) -> None:
    data = os.urandom(3 << 20)
    first = ContentStore(root, lock_wait=0)
    w = await first.writer("restart")
    await w.write(data[: 2 << 20])
    await w.close()

    second = ContentStore(root, lock_wait=0)  # a new daemon: no hash state in memory
    w = await second.writer("restart")
    assert (w.offset, w.rehashed) == (2 << 20, True)
    await w.write(data[2 << 20:])
    assert await w.commit(len(data), sha256(data)) == sha256(data)


async def test_resume_rehashes_when_file_changed(store: ContentStore, root: Path) -> None:
    w = await store.writer("tamper")
    await w.write(b"hello ")
    await w.close()
    data = store.ingest_path("tamper") / "data"
    with open(data, "r+b") as f:  # someone changed the bytes (same size) behind our back
        f.write(b"HELLO ")
    os.utime(data, ns=(1, 1))
    w = await store.writer("tamper")
    assert w.rehashed
    await w.write(b"world")
    with pytest.raises(FailedPrecondition, match="unexpected commit digest"):
        await w.commit(11, sha256(b"hello world"))
    w = await store.writer("tamper")
    assert await w.commit(11, sha256(b"HELLO world")) == sha256(b"HELLO world")


async def test_resume_with_different_total_starts_over(store: ContentStore) -> None:
    w = await store.writer("tot", total=10)
    await w.write(b"12345")
    await w.close()
    w = await store.writer("tot", total=20)
    assert (w.offset, w.total) == (0, 20)
    await w.close()


async def test_damaged_ingest_starts_over(store: ContentStore) -> None:
    w = await store.writer("dmg")
    await w.write(b"12345")
    await w.close()
    (store.ingest_path("dmg") / "startedat").write_text("garbage")
    with pytest.raises(NotFound):
        await store.status("dmg")
    w = await store.writer("dmg")
    assert w.offset == 0
    await w.write(b"ok")
    assert await w.commit(2, sha256(b"ok")) == sha256(b"ok")


async def test_cancelled_owner_still_keeps_bytes_and_unlocks(store: ContentStore) -> None:
    w = await store.writer("cancel")
    await w.write(b"buffered")  # still in memory
    with trio.CancelScope() as scope:
        scope.cancel()
        await w.close()
    assert w.closed
    w = await store.writer("cancel")  # the lock was released
    assert w.offset == 8
    assert await w.commit(8, sha256(b"buffered")) == sha256(b"buffered")


# --- locking -----------------------------------------------------------------------

async def test_second_writer_on_same_ref_is_unavailable(store: ContentStore) -> None:
    w = await store.writer("busy")
    with pytest.raises(Unavailable) as exc:
        await store.writer("busy")
    assert str(exc.value).startswith("ref busy locked for ")
    assert "(since " in str(exc.value) and str(exc.value).endswith("): unavailable")
    assert to_status(exc.value)[0] == Code.UNAVAILABLE
    other = await store.writer("other")  # other refs are independent
    await other.close()
    await w.close()
    w = await store.writer("busy")
    await w.close()


async def test_waiting_writer_gets_the_ref_when_released(root: Path) -> None:
    store = ContentStore(root, lock_wait=60)
    first = await store.writer("handoff")
    await first.write(b"part one ")
    got = []

    async def second() -> None:
        w = await store.writer("handoff")
        got.append(w.offset)
        await w.write(b"part two")
        got.append(await w.commit())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(second)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []  # still waiting for the lock
        await first.close()
    assert got == [9, sha256(b"part one part two")]


async def test_concurrent_writers_one_wins(store: ContentStore) -> None:
    results: list[str] = []

    async def attempt(i: int) -> None:
        try:
            w = await store.writer("race")
        except Unavailable:
            results.append("unavailable")
            return
        async with w:
            results.append("writer")
            await w.write(b"x" * (2 << 20))  # goes to a thread: others run meanwhile
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(attempt, i)
    assert sorted(results) == ["unavailable"] * 4 + ["writer"]


async def test_one_writer_two_tasks_is_an_error(store: ContentStore) -> None:
    w = await store.writer("shared")
    errors = []

    async def use() -> None:
        try:
            await w.write(b"y" * (2 << 20))
        except trio.BusyResourceError:
            errors.append("busy")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(use)
        nursery.start_soon(use)
    assert errors == ["busy"]
    assert w.offset == 2 << 20
    await w.close()


# --- statuses, abort, cleanup --------------------------------------------------------

async def test_status_fields_and_live_offset(store: ContentStore) -> None:
    before = time.time()
    w = await store.writer("st", total=100, expected=sha256(b"z" * 100))
    await w.write(b"z" * 40)  # buffered, not yet on disk
    st = await store.status("st")
    assert (st.ref, st.offset, st.total, st.expected) == ("st", 40, 100, sha256(b"z" * 100))
    assert before - 1 <= st.started_at.timestamp() <= st.updated_at.timestamp()
    await w.close()
    st2 = await store.status("st")
    assert st2.offset == 40
    assert st2.started_at == st.started_at


async def test_list_statuses(store: ContentStore) -> None:
    for ref in ("pull-a", "pull-b", "push-c"):
        w = await store.writer(ref)
        await w.write(ref.encode())
        await w.close()
    live = await store.writer("pull-live")
    await live.write(b"12")
    got = {s.ref: s.offset async for s in store.list_statuses()}
    assert got == {"pull-a": 6, "pull-b": 6, "push-c": 6, "pull-live": 2}
    assert {s.ref async for s in store.list_statuses(r"^pull-[ab]$")} == {"pull-a", "pull-b"}
    assert [s.ref async for s in store.list_statuses(predicate=lambda s: s.offset == 2)] == [
        "pull-live"]
    await live.close()


async def test_abort(store: ContentStore, root: Path) -> None:
    w = await store.writer("ab")
    await w.write(b"data")
    await w.close()
    await store.abort("ab")
    assert ingest_dirs(root) == []
    with pytest.raises(NotFound) as exc:
        await store.status("ab")
    assert str(exc.value) == 'ingest ref "ab": not found'
    with pytest.raises(NotFound):
        await store.abort("ab")
    w = await store.writer("ab")
    assert w.offset == 0
    await w.close()


async def test_abort_while_writing(store: ContentStore, root: Path) -> None:
    w = await store.writer("live-abort")
    await w.write(b"data")
    await store.abort("live-abort")
    with pytest.raises(NotFound):
        await store.status("live-abort")
    with pytest.raises(FailedPrecondition, match="was aborted"):
        await w.write(b"more")
    with pytest.raises(FailedPrecondition, match="was aborted"):
        await w.commit()
    await w.close()
    assert ingest_dirs(root) == []
    assert blob_files(root) == []


async def test_cleanup_removes_only_stale_idle_ingests(store: ContentStore) -> None:
    for ref in ("old-1", "old-2"):
        w = await store.writer(ref)
        await w.write(b"x")
        await w.close()
    active = await store.writer("active")
    await active.write(b"y")
    assert await store.cleanup(3600) == []  # nothing is an hour old yet
    later = time.time() + 7200
    assert sorted(await store.cleanup(3600, now=later)) == ["old-1", "old-2"]
    assert [s.ref async for s in store.list_statuses()] == ["active"]
    await active.close()
    # Leftovers of an ingest that never finished being created go too.
    (store.ingests / "deadbeef").mkdir()
    assert sorted(await store.cleanup(3600, now=later)) == ["active", "deadbeef"]


# --- path safety -------------------------------------------------------------------

@pytest.mark.parametrize("ref", ["../../etc", "../../../../tmp/x", "/etc/passwd", "a/../../b",
                                 "..", "ref\x00with\nnul", "ünïcode ✓"])
async def test_refs_never_become_paths(tmp_path: Path, ref: str) -> None:
    root = tmp_path / "deep" / "content"
    store = ContentStore(root, lock_wait=0)
    before = {p for p in tmp_path.rglob("*")}
    w = await store.writer(ref)
    await w.write(b"escape?")
    await w.close()
    path = store.ingest_path(ref)
    assert path.parent == root / "ingest"
    assert path.name == hashlib.sha256(ref.encode()).hexdigest()
    new = {p for p in tmp_path.rglob("*")} - before
    assert new and all(p.is_relative_to(path) for p in new)
    assert (await store.status(ref)).ref == ref
    assert [s.ref async for s in store.list_statuses()] == [ref]
    w = await store.writer(ref)
    assert await w.commit(7, sha256(b"escape?")) == sha256(b"escape?")
    assert ingest_dirs(root) == []


def test_timestamps_round_trip_go_format() -> None:
    ns = 1_700_000_000_123_456_789
    assert ingest.format_ns(ns) == "2023-11-14T22:13:20.123456789Z"
    assert ingest.parse_ns(ingest.format_ns(ns)) == ns
    assert ingest.format_ns(1_700_000_000_000_000_000) == "2023-11-14T22:13:20Z"
    # containerd writes local time with an offset.
    assert ingest.parse_ns("2023-11-15T00:13:20.5+02:00") == 1_700_000_000_500_000_000
