"""A writer killed with SIGKILL mid-blob: nothing is published, the ingest resumes.

The child process (this file run as a script) streams a large deterministic blob into
a content store, says when it is past the half, and keeps writing; it never commits.
The test kills it at that moment, then plays the restarted daemon: a fresh store on
the same root must show no blob, resume the ingest at its offset (rehashing what is on
disk), take the rest of the stream and commit it under the expected digest.
"""

from __future__ import annotations

import hashlib
import random
import signal
import subprocess
import sys
from pathlib import Path

import trio

from berth.core.content import ContentStore
from berth.core.content.writer import FLUSH_AT

CHUNK = 1 << 20
TOTAL = 192 * CHUNK + 12345  # not chunk-aligned on purpose
REF = "crash/../../blob"
_BLOCK = random.Random(20240601).randbytes(CHUNK)


def stream(offset: int, length: int) -> bytes:
    """Bytes [offset, offset+length) of the test blob: chunk i is its index + a block."""
    out = bytearray()
    while length > 0:
        index, within = divmod(offset, CHUNK)
        chunk = index.to_bytes(8, "big") + _BLOCK[8:]
        piece = chunk[within:within + length]
        out += piece
        offset += len(piece)
        length -= len(piece)
    return bytes(out)


def expected_digest() -> str:
    h = hashlib.sha256()
    for off in range(0, TOTAL, CHUNK):
        h.update(stream(off, min(CHUNK, TOTAL - off)))
    return "sha256:" + h.hexdigest()


async def _child(root: Path) -> None:
    store = ContentStore(root)
    w = await store.writer(REF, total=TOTAL)
    told = False
    # Odd piece sizes: some writes are buffered, some flush, some go straight through.
    sizes = [300 << 10, 7, 2 << 20, 65536]
    i = 0
    while w.offset < TOTAL:
        n = min(sizes[i % len(sizes)], TOTAL - w.offset)
        await w.write(stream(w.offset, n))
        i += 1
        if not told and w.offset >= TOTAL // 2:
            print(f"half {w.offset}", flush=True)
            told = True
    print("done", flush=True)
    sys.stdin.read()  # wait to be killed; committing is not this process's job


async def test_sigkill_mid_write_leaves_no_blob_and_resumes(tmp_path: Path) -> None:
    root = tmp_path / "content"
    want = expected_digest()
    proc = await trio.lowlevel.open_process(
        [sys.executable, __file__, "child", str(root)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    try:
        line = b""
        while b"\n" not in line:
            more = await proc.stdout.receive_some()
            assert more, f"child exited early with {await proc.wait()}"
            line += more
        assert line.startswith(b"half "), line
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await proc.stdin.aclose()
        await proc.stdout.aclose()
    assert proc.returncode == -signal.SIGKILL

    # Nothing was published, not even a partial file.
    assert [p for p in (root / "blobs").rglob("*") if not p.is_dir()] == []

    store = ContentStore(root)  # the restarted daemon
    status = await store.status(REF)
    half = int(line.split()[1])
    # Up to one write buffer of what the child had accepted may not have reached disk.
    assert half - FLUSH_AT <= status.offset <= TOTAL
    assert status.total == TOTAL
    statuses = [s async for s in store.list_statuses()]
    assert [s.ref for s in statuses] == [REF]

    w = await store.writer(REF, total=TOTAL, expected=want)
    assert (w.offset, w.rehashed) == (status.offset, True)
    # What survived the kill is a true prefix of the blob.
    assert w.digest("sha256") == "sha256:" + hashlib.sha256(stream(0, w.offset)).hexdigest()
    while w.offset < TOTAL:
        await w.write(stream(w.offset, min(4 * CHUNK, TOTAL - w.offset)), offset=w.offset)
    assert await w.commit(TOTAL, want) == want

    blob = store.blob_path(want)
    h = hashlib.sha256()
    with open(blob, "rb") as f:
        while data := f.read(4 * CHUNK):
            h.update(data)
    assert "sha256:" + h.hexdigest() == want
    assert blob.stat().st_size == TOTAL
    assert list((root / "ingest").iterdir()) == []


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    trio.run(_child, Path(sys.argv[2]))
