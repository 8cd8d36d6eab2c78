"""Content and garbage collection through the real ctr, berthd against containerd.

Each scenario runs the same commands against a fresh berthd and a fresh containerd and
compares what a client sees. Content nobody references is garbage as soon as any
collection runs, in both daemons, so every scenario waits for the start-up collection
before it writes and deletes nothing before it has used what it wrote.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import subprocess
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import betterproto
import pytest
from grpclib.client import Channel
from grpclib.const import Cardinality
from grpclib.exceptions import GRPCError

from berth.core.api.containerd.services.content import v1 as capi
from berth.core.api.containerd.services.images import v1 as iapi
from berth.core.api.containerd.services.leases import v1 as lapi
from berth.core.api.containerd.types import Descriptor
from tests import daemons

pytestmark = [pytest.mark.interop]

NS = "gctest"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
# Turns a hang into a failure; nothing is measured by it.
HANG_GUARD = 20.0


# --- helpers -------------------------------------------------------------------------------

def wait_startup_gc(d: daemons.Daemon) -> None:
    """Both daemons collect once shortly after start; unreferenced blobs written before
    that would be taken by it."""
    deadline = time.monotonic() + HANG_GUARD
    while "garbage collected" not in d.logs():
        if time.monotonic() > deadline:
            raise AssertionError(f"{d.name}: no start-up garbage collection\n{d.logs()[-3000:]}")
        time.sleep(0.02)


def ctr(d: daemons.Daemon, *args: str, ns: str = NS, stdin: bytes | Path | None = None
        ) -> subprocess.CompletedProcess[bytes]:
    argv = [daemons.CTR, "--address", str(d.address), "--namespace", ns, *args]
    if isinstance(stdin, Path):
        with open(stdin, "rb") as f:
            return subprocess.run(argv, stdin=f, capture_output=True, timeout=60)
    return subprocess.run(argv, input=stdin or b"", capture_output=True, timeout=60)


def out(p: subprocess.CompletedProcess[bytes]) -> str:
    return p.stdout.decode()


def err(p: subprocess.CompletedProcess[bytes]) -> str:
    return p.stderr.decode()


def ingest(d: daemons.Daemon, ref: str, data: bytes, ns: str = NS) -> str:
    p = ctr(d, "content", "ingest", ref, ns=ns, stdin=data)
    assert p.returncode == 0, err(p)
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_file(d: daemons.Daemon, digest: str) -> Path:
    return d.root / "io.containerd.content.v1.content" / "blobs" / "sha256" / \
        digest.removeprefix("sha256:")


def listed(d: daemons.Daemon, ns: str = NS) -> list[str]:
    p = ctr(d, "content", "ls", "-q", ns=ns)
    assert p.returncode == 0, err(p)
    return out(p).split()


def label_set(text: str) -> set[str]:
    return set(filter(None, text.strip().split(",")))


def eventually(check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + HANG_GUARD
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition never held")
        time.sleep(0.05)


def grpc(d: daemons.Daemon, fn: Callable[[Channel], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        channel = Channel(path=str(d.address))
        try:
            return await fn(channel)
        finally:
            channel.close()

    return asyncio.run(run())


def md(ns: str | None = NS, lease: str | None = None) -> dict[str, str]:
    m = {"containerd-namespace": ns} if ns else {}
    if lease:
        m["containerd-lease"] = lease
    return m


async def unary(ch: Channel, path: str, req: betterproto.Message, reply: type,
                metadata: dict[str, str]) -> Any:
    """The reply, or (code name, message) of the error."""
    try:
        async with ch.request(path, Cardinality.UNARY_UNARY, type(req), reply,
                              metadata=metadata) as st:
            await st.send_message(req, end=True)
            return await st.recv_message()
    except GRPCError as e:
        return (e.status.name, e.message)


async def server_stream(ch: Channel, path: str, req: betterproto.Message, reply: type,
                        metadata: dict[str, str]) -> Any:
    got = []
    try:
        async with ch.request(path, Cardinality.UNARY_STREAM, type(req), reply,
                              metadata=metadata) as st:
            await st.send_message(req, end=True)
            async for m in st:
                got.append(m)
    except GRPCError as e:
        got.append((e.status.name, e.message))
    return got


def when(t: datetime | None) -> str:
    """Timestamps differ between runs; whether one is set, and to Go's zero, does not."""
    if t is None or t == datetime(1970, 1, 1, tzinfo=UTC):
        return "unset"
    if t.year == 1:
        return "zero"
    return "set"


CONTENT = "/containerd.services.content.v1.Content/"


# --- ctr content ---------------------------------------------------------------------------

def basics(d: daemons.Daemon) -> list[Any]:
    wait_startup_gc(d)
    seen: list[Any] = []
    data = b"hello berth\n"
    digest = ingest(d, "r1", data)
    seen.append(listed(d))
    p = ctr(d, "content", "get", digest)
    seen.append((p.returncode, p.stdout))
    p = ctr(d, "content", "label", digest, "a=b", "c=d")
    seen.append((p.returncode, label_set(out(p))))
    p = ctr(d, "content", "label", digest, "a=")
    seen.append((p.returncode, label_set(out(p))))
    p = ctr(d, "content", "label", digest)  # no labels: shows the current ones
    seen.append((p.returncode, label_set(out(p))))
    rows = [line.split("\t") for line in out(ctr(d, "content", "ls")).splitlines()]
    seen.append([(r[0], r[1], r[-1]) for r in (filter(None, row) for row in rows)
                 for r in [list(r)]])
    seen.append(listed(d, "other"))
    missing = "sha256:" + "0" * 64
    p = ctr(d, "content", "get", missing)
    seen.append((p.returncode, err(p)))
    p = ctr(d, "content", "label", missing, "x=y")
    seen.append((p.returncode, err(p)))
    big = random.Random(7).randbytes(3 << 20) + b"tail"  # several Read chunks
    big_digest = ingest(d, "big", big)
    p = ctr(d, "content", "get", big_digest)
    seen.append((p.returncode, p.stdout == big))
    # The first removal makes a collection due, which could take the unreferenced big
    # blob before ctr gets to it.
    ctr(d, "content", "label", big_digest, "containerd.io/gc.root=yes")
    p = ctr(d, "content", "rm", digest, big_digest)
    seen.append((p.returncode, out(p).split()))
    p = ctr(d, "content", "rm", digest)  # already gone: not an error for ctr
    seen.append((p.returncode, out(p), err(p)))
    seen.append(listed(d))
    return seen


def test_ingest_list_get_label_remove(berthd: daemons.Daemon,
                                      containerd: daemons.Daemon) -> None:
    ours, theirs = basics(berthd), basics(containerd)
    assert ours == theirs
    digest = "sha256:" + hashlib.sha256(b"hello berth\n").hexdigest()
    assert ours[0] == [digest]
    assert ours[1] == (0, b"hello berth\n")
    assert ours[2] == (0, {"a=b", "c=d"}) and ours[3] == (0, {"c=d"})
    assert ours[5][1] == (digest, "12B", "c=d")
    assert ours[6] == []
    assert ours[7][0] == 1 and "content digest sha256:000" in ours[7][1]
    assert ours[9] == (0, True)
    assert ours[-1] == []


def expectations(d: daemons.Daemon, tmp: Path) -> list[Any]:
    wait_startup_gc(d)
    seen: list[Any] = []
    wrong = "sha256:" + "1" * 64
    p = ctr(d, "content", "ingest", "--expected-digest", wrong, "bad", stdin=b"partial")
    seen.append((p.returncode, err(p)))
    p = ctr(d, "content", "ingest", "--expected-size", "3", "sized", stdin=b"toolong")
    seen.append((p.returncode, err(p)))
    active = out(ctr(d, "content", "active"))
    seen.append(sorted(tuple(line.split("\t")[:2]) for line in active.splitlines()[1:]))
    seen.append(out(ctr(d, "content", "active", "ref==bad")).splitlines()[1:][0].split("\t")[0])
    # The ingest survived the failed commit: ctr resumes it (seeking its input past the
    # 7 bytes already there) and the commit succeeds.
    f = tmp / f"{d.name}.partial"
    f.write_bytes(b"partial")
    p = ctr(d, "content", "ingest", "bad", stdin=f)
    seen.append((p.returncode, err(p)))
    digest = "sha256:" + hashlib.sha256(b"partial").hexdigest()
    # Already present with the expected digest: nothing to do, no error.
    p = ctr(d, "content", "ingest", "--expected-digest", digest, "again", stdin=b"ignored")
    seen.append((p.returncode, out(p), err(p)))
    seen.append(sorted(line.split("\t")[0] for line in
                       out(ctr(d, "content", "active")).splitlines()[1:]))
    seen.append(listed(d))
    return seen


def test_expected_digest_and_size_errors_match(
        berthd: daemons.Daemon, containerd: daemons.Daemon, tmp_path: Path) -> None:
    ours, theirs = expectations(berthd, tmp_path), expectations(containerd, tmp_path)
    assert ours == theirs
    assert ours[0][0] == 1 and "unexpected commit digest sha256:" in ours[0][1]
    assert ours[0][1].rstrip().endswith(": failed precondition")
    assert ours[1] == (1, 'ctr: failed commit on ref "sized": commit failed: "sized" failed '
                          "size validation: 7 != 3: failed precondition\n")
    assert ours[2] == [("bad", "7B"), ("sized", "7B")]
    assert ours[4] == (0, "")
    assert ours[5] == (0, "", "")
    assert ours[6] == ["sized"]


def namespaces_and_sharing(d: daemons.Daemon, tmp: Path) -> list[Any]:
    wait_startup_gc(d)
    seen: list[Any] = []
    data = b"shared between namespaces"
    digest = ingest(d, "one", data, ns="ns1")
    p = ctr(d, "content", "get", digest, ns="ns2")
    seen.append((p.returncode, err(p)))
    # Importing by digest: the bytes are in the backend already, ctr just commits.
    f = tmp / f"{d.name}.blob"
    f.write_bytes(data)
    p = ctr(d, "content", "ingest", "--expected-digest", digest, "two", ns="ns2", stdin=f)
    seen.append((p.returncode, err(p)))
    seen.append(listed(d, "ns2"))
    # Keep ns2's record through the collection that the removal below makes due.
    ctr(d, "content", "label", digest, "containerd.io/gc.root=yes", ns="ns2")
    p = ctr(d, "content", "rm", digest, ns="ns1")
    seen.append(out(p).split())
    seen.append((listed(d, "ns1"), listed(d, "ns2")))
    seen.append(ctr(d, "content", "get", digest, ns="ns2").stdout)
    seen.append(blob_file(d, digest).exists())
    ctr(d, "content", "rm", digest, ns="ns2")
    eventually(lambda: not blob_file(d, digest).exists())
    return seen


def test_namespaces_see_only_their_blobs_and_share_bytes(
        berthd: daemons.Daemon, containerd: daemons.Daemon, tmp_path: Path) -> None:
    ours = namespaces_and_sharing(berthd, tmp_path)
    theirs = namespaces_and_sharing(containerd, tmp_path)
    assert ours == theirs
    assert ours[0][0] == 1 and "not found" in ours[0][1]
    assert ours[1] == (0, "")
    assert ours[4] == ([], ours[2]) and ours[6] is True


# --- the Content API directly ----------------------------------------------------------------

def _write_view(m: Any) -> Any:
    if isinstance(m, tuple):
        return m
    if m is None:
        return None
    return (m.action.name, m.offset, m.total, m.digest, when(m.started_at), when(m.updated_at))


async def write_session(ch: Channel, reqs: list[capi.WriteContentRequest],
                        metadata: dict[str, str]) -> list[Any]:
    got: list[Any] = []
    try:
        async with ch.request(CONTENT + "Write", Cardinality.STREAM_STREAM,
                              capi.WriteContentRequest, capi.WriteContentResponse,
                              metadata=metadata) as st:
            # The last request half-closes, so the server's closing of the stream cannot
            # race the responses still in flight.
            for i, r in enumerate(reqs):
                await st.send_message(r, end=i == len(reqs) - 1)
                got.append(await st.recv_message())
            async for m in st:
                got.append(("again", _write_view(m)))
    except GRPCError as e:
        got.append((e.status.name, e.message))
    return [_write_view(m) for m in got]


def api_scenario(d: daemons.Daemon) -> list[Any]:
    wait_startup_gc(d)
    stat, write, commit = (capi.WriteAction.STAT, capi.WriteAction.WRITE,
                           capi.WriteAction.COMMIT)
    abc = "sha256:" + hashlib.sha256(b"abcde").hexdigest()
    sessions = [
        [capi.WriteContentRequest(action=stat, ref="s1", total=5)],
        [capi.WriteContentRequest(action=write, ref="s2", data=b"abc"),
         capi.WriteContentRequest(action=write, offset=3, data=b"de"),
         capi.WriteContentRequest(action=commit, offset=5, total=5, expected=abc,
                                  labels={"containerd.io/gc.root": "test"})],
        [capi.WriteContentRequest(action=stat, ref="")],
        [capi.WriteContentRequest(action=write, ref="s3", data=b"abc"),
         capi.WriteContentRequest(action=write, offset=7, data=b"de")],
        [capi.WriteContentRequest(action=write, ref="s4", data=b"abc"),
         capi.WriteContentRequest(action=commit, total=7)],
        [capi.WriteContentRequest(action=stat, ref="s5", expected=abc)],
        # Resume: the offset continues where the first session stopped.
        [capi.WriteContentRequest(action=stat, ref="s6"),
         capi.WriteContentRequest(action=write, data=b"xy")],
        [capi.WriteContentRequest(action=stat, ref="s6"),
         capi.WriteContentRequest(action=write, offset=2, data=b"z")],
        [capi.WriteContentRequest(action=write, ref="s7", data=b"abcde")],
        [capi.WriteContentRequest(action=stat, ref="s7"),
         capi.WriteContentRequest(action=commit, offset=5, expected=abc)],
    ]

    async def run(ch: Channel) -> list[Any]:
        seen: list[Any] = []
        for reqs in sessions:
            seen.append(await write_session(ch, reqs, md()))
        seen.append(await write_session(ch, sessions[0], md(None)))
        info = await unary(ch, CONTENT + "Info", capi.InfoRequest(digest=abc),
                           capi.InfoResponse, md())
        seen.append((info.info.digest, info.info.size, dict(info.info.labels),
                     when(info.info.created_at), when(info.info.updated_at)))
        for digest in ("sha256:abc", "", "sha256:" + "2" * 64):
            r = await unary(ch, CONTENT + "Info", capi.InfoRequest(digest=digest),
                            capi.InfoResponse, md())
            seen.append(r)
        seen.append(await unary(ch, CONTENT + "Info", capi.InfoRequest(digest=abc),
                                capi.InfoResponse, md(None)))
        for offset, size in ((0, 0), (1, 2), (-4, 3), (4, 99), (5, 0), (6, 0)):
            got = await server_stream(ch, CONTENT + "Read", capi.ReadContentRequest(
                digest=abc, offset=offset, size=size), capi.ReadContentResponse, md())
            seen.append([g if isinstance(g, tuple) else (g.offset, g.data) for g in got])
        seen.append(await server_stream(ch, CONTENT + "Read", capi.ReadContentRequest(
            digest="nope"), capi.ReadContentResponse, md()))
        upd = capi.UpdateRequest(info=capi.Info(digest=abc, labels={"x": "1", "y": "2"}))
        for paths in (["labels.x"], ["labels"], ["size"], []):
            upd.update_mask = betterproto.lib.google.protobuf.FieldMask(paths=paths)
            r = await unary(ch, CONTENT + "Update", upd, capi.UpdateResponse, md())
            seen.append(r if isinstance(r, tuple) else sorted(r.info.labels.items()))
        lst = await server_stream(ch, CONTENT + "List", capi.ListContentRequest(),
                                  capi.ListContentResponse, md())
        seen.append([(i.digest, i.size, when(i.created_at), when(i.updated_at))
                     for resp in lst for i in resp.info])
        for flt in ([f"digest=={abc}"], ["labels.x==1"], ["labels.x==2"], ["size==5"],
                    ["digest=="]):
            lst = await server_stream(ch, CONTENT + "List", capi.ListContentRequest(
                filters=flt), capi.ListContentResponse, md())
            seen.append([x if isinstance(x, tuple) else [i.digest for i in x.info]
                         for x in lst])
        st = await unary(ch, CONTENT + "Status", capi.StatusRequest(ref="s6"),
                         capi.StatusResponse, md())
        seen.append((st.status.ref, st.status.offset, st.status.total, st.status.expected,
                     when(st.status.started_at)))
        seen.append(await unary(ch, CONTENT + "Status", capi.StatusRequest(ref="none"),
                                capi.StatusResponse, md()))
        statuses = await unary(ch, CONTENT + "ListStatuses", capi.ListStatusesRequest(),
                               capi.ListStatusesResponse, md())
        seen.append(sorted((s.ref, s.offset) for s in statuses.statuses))
        statuses = await unary(ch, CONTENT + "ListStatuses", capi.ListStatusesRequest(
            filters=["ref==s6"]), capi.ListStatusesResponse, md())
        seen.append([s.ref for s in statuses.statuses])
        seen.append(await unary(ch, CONTENT + "Abort", capi.AbortRequest(ref="s6"),
                                betterproto.lib.google.protobuf.Empty, md()) is not None)
        seen.append(await unary(ch, CONTENT + "Abort", capi.AbortRequest(ref="s6"),
                                betterproto.lib.google.protobuf.Empty, md()))
        for digest in ("bad", abc, abc):
            r = await unary(ch, CONTENT + "Delete", capi.DeleteContentRequest(digest=digest),
                            betterproto.lib.google.protobuf.Empty, md())
            seen.append(r if isinstance(r, tuple) else "deleted")
        return seen

    return grpc(d, run)


def test_content_api_matches_containerd(berthd: daemons.Daemon,
                                        containerd: daemons.Daemon) -> None:
    ours, theirs = api_scenario(berthd), api_scenario(containerd)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a == b, f"step {i}: berth {a!r} != containerd {b!r}"
    abc = "sha256:" + hashlib.sha256(b"abcde").hexdigest()
    # The commit's response, then the same response once more as the stream ends.
    assert ours[1][-2:] == [("COMMIT", 5, 0, abc, "zero", "zero"),
                            ("again", ("COMMIT", 5, 0, abc, "zero", "zero"))]
    assert ours[2] == [("INVALID_ARGUMENT", "first message must have a reference")]
    assert ours[3][-1] == ("OUT_OF_RANGE", "write @7 must occur at current offset 3")


# --- garbage collection ----------------------------------------------------------------------

def gc_scenario(d: daemons.Daemon) -> list[Any]:
    wait_startup_gc(d)
    seen: list[Any] = []
    layer = ingest(d, "layer", b"layer bytes " + d.name.encode())
    config = ingest(d, "config", b'{"config": true}')
    manifest_body = b'{"manifest": "' + layer.encode() + b'"}'
    manifest = ingest(d, "manifest", manifest_body)
    p = ctr(d, "content", "label", manifest, f"containerd.io/gc.ref.content.config={config}",
            f"containerd.io/gc.ref.content.l.0={layer}")
    assert p.returncode == 0, err(p)
    p = ctr(d, "leases", "create", "--id", "hold")
    assert p.returncode == 0, err(p)

    async def setup(ch: Channel) -> list[Any]:
        r1 = await unary(ch, "/containerd.services.leases.v1.Leases/AddResource",
                         lapi.AddResourceRequest(id="hold", resource=lapi.Resource(
                             id=layer, type="content")),
                         betterproto.lib.google.protobuf.Empty, md())
        r2 = await unary(ch, "/containerd.services.images.v1.Images/Create",
                         iapi.CreateImageRequest(image=iapi.Image(
                             name="example.com/app:1",
                             target=Descriptor(media_type=MANIFEST, digest=manifest,
                                               size=len(manifest_body)))),
                         iapi.CreateImageResponse, md())
        return [isinstance(r1, betterproto.Message), r2.image.name]

    seen.append(grpc(d, setup))
    seen.append(sorted(listed(d)) == sorted([layer, config, manifest]))
    p = ctr(d, "images", "rm", "--sync", "example.com/app:1")
    seen.append((p.returncode, out(p)))
    # Synchronous: by the time ctr returns, records and files are gone.
    seen.append(listed(d))
    seen.append([blob_file(d, x).exists() for x in (layer, config, manifest)])
    p = ctr(d, "leases", "rm", "--sync", "hold")
    seen.append(p.returncode)
    eventually(lambda: not blob_file(d, layer).exists())
    seen.append(listed(d))
    return seen


def test_image_removal_collects_its_content_but_not_leased(
        berthd: daemons.Daemon, containerd: daemons.Daemon) -> None:
    ours, theirs = gc_scenario(berthd), gc_scenario(containerd)
    layer = ["sha256:" + hashlib.sha256(b"layer bytes " + n).hexdigest()
             for n in (b"berth", b"containerd")]
    assert ours[:3] == theirs[:3] == [[True, "example.com/app:1"], True,
                                      (0, "example.com/app:1\n")]
    assert ours[3] == [layer[0]] and theirs[3] == [layer[1]]
    assert ours[4] == theirs[4] == [True, False, False]
    assert ours[5:] == theirs[5:] == [0, []]


def test_gc_logs_what_it_removed(berthd: daemons.Daemon) -> None:
    wait_startup_gc(berthd)
    digest = ingest(berthd, "junk", b"nobody wants me")
    ctr(berthd, "content", "rm", digest)  # a deletion: collection at the next tick
    eventually(lambda: not blob_file(berthd, digest).exists())

    def gc_lines() -> list[str]:
        return [line for line in berthd.logs().splitlines() if '"garbage collected"' in line]

    # The summary is logged after the sweep that removed the file: wait for it too.
    eventually(lambda: any(re.search(r'"blobs": 1\b', line) for line in gc_lines()))
