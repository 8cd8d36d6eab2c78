"""Layer entry rules, compression detection and the hashing read-ahead, without root."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile

import pytest
import zstandard

from berth.core import errdefs
from berth.core.archive import compression
from berth.plugins.differ import ApplyTarget, layer, target_for_mounts
from berth.plugins.differ.apply import HashingReader
from berth.plugins.differ.layer import Kind

# -- paths -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("etc/passwd", ("etc", "passwd")),
        ("./etc//passwd", ("etc", "passwd")),
        ("usr/bin/", ("usr", "bin")),
        ("./", ()),
        (".", ()),
        ("a/./b/.", ("a", "b")),
        ("..foo/bar..", ("..foo", "bar..")),
        # Cleaned as containerd does, a join rooted at the layer (issue 8.9).
        ("/etc/passwd", ("etc", "passwd")),
        ("//etc", ("etc",)),
        ("/", ()),
        ("a/../b", ("b",)),
        ("a/..", ()),
        ("a/b/../../c/./d/", ("c", "d")),
        ("./a/../b/../c", ("c",)),
    ],
)
def test_clean_path(name: str, parts: tuple[str, ...]) -> None:
    assert layer.clean_path(name, entry=name) == parts


def test_clean_path_is_a_rooted_clean() -> None:
    # Against the definition: Go's filepath.Clean of "/" + name, when no ".." climbs above
    # the root; otherwise a refusal. Seeded and bounded, over the pieces that matter.
    import posixpath
    import random

    rng = random.Random(8_9)
    pieces = ["", ".", "..", "a", "b", "..a", ".wh.x", "/"]
    for _ in range(20000):
        name = "/".join(rng.choice(pieces) for _ in range(rng.randint(1, 7)))
        depth, climbs = 0, False
        for part in name.split("/"):
            if part == "..":
                climbs = climbs or depth == 0
                depth = max(depth - 1, 0)
            elif part not in ("", "."):
                depth += 1
        if climbs:
            with pytest.raises(errdefs.InvalidArgument):
                layer.clean_path(name, entry=name)
            continue
        cleaned = posixpath.normpath("/" + name).lstrip("/")
        assert layer.clean_path(name, entry=name) == tuple(p for p in cleaned.split("/") if p)


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("../escape", "contains '..' leading out of the root"),
        ("a/../../escape", "contains '..'"),
        ("./..", "contains '..'"),
        ("a/b/../../..", "contains '..'"),
        # containerd clamps "/.." to the root; berth refuses every climb above it.
        ("/../etc/passwd", "contains '..'"),
        ("a\x00b", "NUL"),
    ],
)
def test_clean_path_refuses_escapes(name: str, needle: str) -> None:
    with pytest.raises(errdefs.InvalidArgument) as info:
        layer.clean_path(name, entry=name)
    assert info.value.code == errdefs.Code.INVALID_ARGUMENT
    assert needle in str(info.value)
    assert repr(name) in str(info.value)  # the message names the entry


# -- plan --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("typeflag", "kind"),
    [
        (tarfile.REGTYPE, Kind.FILE),
        (tarfile.AREGTYPE, Kind.FILE),
        (tarfile.CONTTYPE, Kind.FILE),
        (tarfile.DIRTYPE, Kind.DIR),
        (tarfile.CHRTYPE, Kind.CHAR),
        (tarfile.BLKTYPE, Kind.BLOCK),
        (tarfile.FIFOTYPE, Kind.FIFO),
    ],
)
def test_plan_kinds(typeflag: bytes, kind: Kind) -> None:
    action = layer.plan("./usr/lib/x", typeflag)
    assert action.kind is kind
    assert action.path == ("usr", "lib", "x")
    assert action.parent == ("usr", "lib")
    assert action.base == "x"


def test_plan_symlink_keeps_any_target() -> None:
    # A symlink's target is content: it may be absolute or climb, it is never
    # resolved by the unpacker.
    action = layer.plan("bin/sh", tarfile.SYMTYPE, "/bin/busybox")
    assert (action.kind, action.path) == (Kind.SYMLINK, ("bin", "sh"))
    assert layer.plan("x", tarfile.SYMTYPE, "../../../etc").kind is Kind.SYMLINK


def test_plan_symlink_without_target_is_refused() -> None:
    with pytest.raises(errdefs.InvalidArgument, match="symlink without a target"):
        layer.plan("x", tarfile.SYMTYPE, "")


def test_plan_hardlink() -> None:
    action = layer.plan("usr/bin/b", tarfile.LNKTYPE, "./usr/bin/a")
    assert action.kind is Kind.HARDLINK
    assert action.link == ("usr", "bin", "a")
    # An absolute target names a path inside the layer's root, as in containerd.
    action = layer.plan("/usr/bin/b", tarfile.LNKTYPE, "/usr/lib/../bin/a")
    assert (action.path, action.link) == (("usr", "bin", "b"), ("usr", "bin", "a"))


@pytest.mark.parametrize(
    ("linkname", "needle"),
    [
        ("../../../../etc/shadow", "hard link target '../../../../etc/shadow' contains '..'"),
        ("/../etc/shadow", "hard link target '/../etc/shadow' contains '..'"),
        ("", "hard link without a target"),
        ("./", "hard link to the root"),
        ("/", "hard link to the root"),
        ("x", "hard link to itself"),
    ],
)
def test_plan_hardlink_refusals(linkname: str, needle: str) -> None:
    with pytest.raises(errdefs.InvalidArgument) as info:
        layer.plan("x", tarfile.LNKTYPE, linkname)
    assert needle in str(info.value)
    assert "layer entry 'x'" in str(info.value)


def test_plan_root_is_skipped() -> None:
    assert layer.plan("./", tarfile.DIRTYPE).kind is Kind.SKIP


def test_plan_unknown_type_is_skipped() -> None:
    action = layer.plan("volume", tarfile.GNUTYPE_LONGLINK + b"V")
    assert action.kind is Kind.SKIP
    assert "unsupported tar entry type" in action.reason


# -- whiteouts ------------------------------------------------------------------


def test_whiteout() -> None:
    action = layer.plan("etc/.wh.shadow", tarfile.REGTYPE)
    assert (action.kind, action.path) == (Kind.WHITEOUT, ("etc", "shadow"))


def test_whiteout_of_any_type_is_a_whiteout() -> None:
    # containerd decides by name alone.
    assert layer.plan(".wh.x", tarfile.CHRTYPE).kind is Kind.WHITEOUT
    assert layer.plan(".wh.x", tarfile.LNKTYPE, "y").kind is Kind.WHITEOUT


def test_opaque() -> None:
    assert layer.plan("var/lib/.wh..wh..opq", tarfile.REGTYPE).path == ("var", "lib")
    action = layer.plan(".wh..wh..opq", tarfile.REGTYPE)
    assert (action.kind, action.path) == (Kind.OPAQUE, ())


def test_whiteout_metadata_is_skipped() -> None:
    assert layer.plan(".wh..wh.plnk/1.2", tarfile.REGTYPE).kind is Kind.FILE  # a dir name
    assert layer.plan("a/.wh..wh.aufs", tarfile.REGTYPE).kind is Kind.SKIP


@pytest.mark.parametrize("name", ["a/.wh..", "a/.wh...", ".wh.", "./.wh..", "x/.wh./"])
def test_whiteout_of_dot_or_dotdot_is_refused(name: str) -> None:
    with pytest.raises(errdefs.InvalidArgument) as info:
        layer.plan(name, tarfile.REGTYPE)
    assert "invalid whiteout" in str(info.value)
    assert repr(name) in str(info.value)


def test_whiteout_name_with_dotdot_path_is_refused() -> None:
    with pytest.raises(errdefs.InvalidArgument, match="contains '..'"):
        layer.plan("../.wh.x", tarfile.REGTYPE)


# -- xattrs and times -------------------------------------------------------------


def test_xattrs_round_trip_binary_values_through_tarfile() -> None:
    raw = {"user.bin": b"\xff\x00\x01", "security.capability": b"\x01\x00\x00\x02" + bytes(16),
           "user.text": "héllo".encode()}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("f")
        info.pax_headers = {
            layer.PAX_XATTR_PREFIX + k: v.decode("utf-8", "surrogateescape")
            for k, v in raw.items()
        }
        tar.addfile(info)
    buf.seek(0)
    with tarfile.open(fileobj=buf, mode="r|", encoding="utf-8", errors="surrogateescape") as tar:
        member = tar.next()
        assert member is not None
        assert layer.xattrs(member.pax_headers) == raw


def test_xattr_trusted_namespace_is_not_allowed() -> None:
    assert not layer.xattr_allowed("trusted.overlay.opaque")
    assert layer.xattr_allowed("security.capability")
    assert layer.xattr_allowed("user.foo")


def test_entry_times() -> None:
    assert layer.entry_times(1000, {}) == (1000 * 10**9, 1000 * 10**9)
    precise = {"mtime": "1700000000.123456789", "atime": "1700000001.5"}
    assert layer.entry_times(1700000000, precise) == (1700000001_500000000, 1700000000_123456789)
    # An access time older than the modification time is raised to it.
    assert layer.entry_times(2000, {"atime": "1000"}) == (2000 * 10**9, 2000 * 10**9)
    assert layer.time_ns("-1.5") == -1_500_000_000
    assert layer.time_ns("junk") is None


# -- compression -------------------------------------------------------------------

TAR_HEAD = b"etc/passwd" + bytes(100)


def test_detect() -> None:
    assert compression.detect(gzip.compress(b"x")) is compression.Compression.GZIP
    assert compression.detect(zstandard.compress(b"x")) is compression.Compression.ZSTD
    skippable = (0x184D2A5A).to_bytes(4, "little") + (4).to_bytes(4, "little") + b"abcd"
    assert compression.detect(skippable) is compression.Compression.ZSTD
    assert compression.detect(TAR_HEAD) is compression.Compression.UNCOMPRESSED
    assert compression.detect(b"") is compression.Compression.UNCOMPRESSED


@pytest.mark.parametrize(
    ("media_type", "expected"),
    [
        ("application/vnd.oci.image.layer.v1.tar", compression.Compression.UNCOMPRESSED),
        ("application/vnd.oci.image.layer.v1.tar+gzip", compression.Compression.GZIP),
        ("application/vnd.oci.image.layer.v1.tar+zstd", compression.Compression.ZSTD),
        ("application/vnd.docker.image.rootfs.diff.tar.gzip", compression.Compression.GZIP),
    ],
)
def test_media_types(media_type: str, expected: compression.Compression) -> None:
    assert compression.from_media_type(media_type) is expected


def test_unknown_media_type() -> None:
    with pytest.raises(errdefs.NotImplemented_, match="application/vnd.oci.image.config"):
        compression.from_media_type("application/vnd.oci.image.config.v1+json")


def _read_all(reader: compression.Reader, chunk: int = 7) -> bytes:
    out = []
    while data := reader.read(chunk):
        assert len(data) <= chunk
        out.append(data)
    return b"".join(out)


PAYLOAD = bytes(range(256)) * 300


@pytest.mark.parametrize(
    "blob",
    [
        PAYLOAD,
        gzip.compress(PAYLOAD),
        gzip.compress(PAYLOAD[:1000]) + gzip.compress(PAYLOAD[1000:]),  # two members
        zstandard.compress(PAYLOAD),
        zstandard.compress(PAYLOAD[:5]) + zstandard.compress(PAYLOAD[5:]),  # two frames
    ],
    ids=["plain", "gzip", "gzip-multimember", "zstd", "zstd-multiframe"],
)
def test_open_stream_round_trip(blob: bytes) -> None:
    reader = compression.open_stream(io.BytesIO(blob))
    assert _read_all(reader) == PAYLOAD
    assert reader.read(10) == b""
    reader.close()


def test_open_stream_bounds_output_per_read() -> None:
    # 64 MiB of zeros compress to a few KiB; one read must not inflate them all.
    blob = gzip.compress(bytes(64 << 20), compresslevel=1)
    reader = compression.open_stream(io.BytesIO(blob))
    assert len(reader.read(4096)) <= 4096


def test_open_stream_explicit_compression() -> None:
    reader = compression.open_stream(io.BytesIO(gzip.compress(PAYLOAD)),
                                     compression.Compression.GZIP)
    assert reader.compression is compression.Compression.GZIP
    assert _read_all(reader, 1 << 20) == PAYLOAD


def test_open_stream_empty_is_empty() -> None:
    reader = compression.open_stream(io.BytesIO(b""))
    assert reader.compression is compression.Compression.UNCOMPRESSED
    assert reader.read(10) == b""


def test_truncated_gzip_fails() -> None:
    blob = gzip.compress(PAYLOAD)[:-20]
    with pytest.raises(errdefs.InvalidArgument, match="gzip stream: unexpected end of data"):
        _read_all(compression.open_stream(io.BytesIO(blob)), 1 << 20)


def test_corrupt_gzip_fails() -> None:
    blob = bytearray(gzip.compress(PAYLOAD))
    blob[20:40] = bytes(20)
    with pytest.raises(errdefs.InvalidArgument, match="gzip stream"):
        _read_all(compression.open_stream(io.BytesIO(bytes(blob))), 1 << 20)


def test_gzip_trailing_garbage_fails() -> None:
    blob = gzip.compress(PAYLOAD) + b"garbage!"
    with pytest.raises(errdefs.InvalidArgument, match="trailing garbage"):
        _read_all(compression.open_stream(io.BytesIO(blob)), 1 << 20)


def test_truncated_zstd_fails() -> None:
    blob = zstandard.compress(PAYLOAD)[:-10]
    with pytest.raises(errdefs.InvalidArgument, match="zstd stream"):
        _read_all(compression.open_stream(io.BytesIO(blob)), 1 << 20)


# -- hashing read-ahead ------------------------------------------------------------


def test_hashing_reader_hashes_and_counts() -> None:
    data = bytes(range(256)) * 5000
    reader = HashingReader(io.BytesIO(data), chunk=1000, depth=2)
    try:
        got = b"".join(iter(lambda: reader.read(333), b""))
        reader.drain()
    finally:
        reader.close()
    assert got == data
    assert reader.size == len(data)
    assert reader.digest() == "sha256:" + hashlib.sha256(data).hexdigest()


def test_hashing_reader_passes_errors_on() -> None:
    class Broken(io.RawIOBase):
        def read(self, n: int = -1) -> bytes:
            raise errdefs.InvalidArgument("gzip stream: boom")

    reader = HashingReader(Broken())  # type: ignore[arg-type]
    try:
        with pytest.raises(errdefs.InvalidArgument, match="boom"):
            reader.read(10)
    finally:
        reader.close()


def test_hashing_reader_close_midway_stops_the_thread() -> None:
    reader = HashingReader(io.BytesIO(bytes(10 << 20)), chunk=4096, depth=1)
    assert reader.read(10) == bytes(10)
    reader.close()
    assert not reader._thread.is_alive()


# -- mounts -----------------------------------------------------------------------


def test_target_for_mounts() -> None:
    overlay = ("overlay", "overlay", ["index=off", "workdir=/s/2/work", "upperdir=/s/2/fs",
                                      "lowerdir=/s/1/fs:/s/0/fs"])
    assert target_for_mounts([overlay]) == ApplyTarget("/s/2/fs", "overlay",
                                                        ("/s/1/fs", "/s/0/fs"))
    bind = ("bind", "/s/3/fs", ["rbind", "rw"])
    assert target_for_mounts([bind]) == ApplyTarget("/s/3/fs", "native")
    # overlay with only lowers (a view) cannot be written: the caller mounts it.
    assert target_for_mounts([("overlay", "overlay", ["lowerdir=/a:/b"])]) is None
    assert target_for_mounts([overlay, bind]) is None


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"write_checksum": True},
        {"write_content_size": False},
        {"write_checksum": True, "write_content_size": False, "level": 19},
    ],
)
def test_zstd_frame_variants_round_trip(options: dict) -> None:
    data = PAYLOAD + bytes(300_000) + PAYLOAD  # raw, RLE and compressed blocks
    blob = zstandard.ZstdCompressor(**options).compress(data)
    skippable = (0x184D2A50).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    for stream in (blob, skippable + blob + skippable, blob + blob):
        got = _read_all(compression.open_stream(io.BytesIO(stream)), 1 << 16)
        assert got == (data * 2 if stream == blob + blob else data)
        # Cut anywhere inside: an error, never a silently shorter stream.
        for cut in (len(stream) - 1, len(stream) - 4, len(blob) // 2, 9):
            with pytest.raises(errdefs.InvalidArgument, match="zstd stream"):
                _read_all(compression.open_stream(io.BytesIO(stream[:cut])), 1 << 16)


def test_zstd_streaming_writer_round_trip() -> None:
    # A streamed frame has no content size and many blocks, as containerd writes them.
    out = io.BytesIO()
    with zstandard.ZstdCompressor(write_checksum=True).stream_writer(out, closefd=False) as w:
        for _ in range(50):
            w.write(PAYLOAD)
            w.flush()
    got = _read_all(compression.open_stream(io.BytesIO(out.getvalue())), 1 << 20)
    assert got == PAYLOAD * 50
