"""Layer compression: recognise gzip, zstd or a plain tar and stream the tar back out.

Detection looks at the first bytes, as containerd does, so a blob whose media type
says one thing and whose bytes say another still unpacks. Media types only tell us
whether a blob is a layer at all.

Decompressors are pull-based readers (``read(n)`` returns at most ``n`` bytes, ``b""``
at the end) and never hold more than about one output chunk in memory, so a highly
compressible layer cannot blow up memory.
"""

from __future__ import annotations

import enum
import zlib
from types import ModuleType
from typing import Protocol, cast

import zstandard

from berth.core import errdefs

try:
    # ISA-L's inflate (python-isal): zlib's API, about twice zlib's speed, which is
    # most of what unpacking a gzip layer costs.
    from isal import isal_zlib

    _inflate_lib: ModuleType = isal_zlib
    # isal's stub declares error an instance; it is the exception class.
    _INFLATE_ERRORS: tuple[type[Exception], ...] = (
        zlib.error, cast("type[Exception]", isal_zlib.error))
except ImportError:  # pragma: no cover - isal is a dependency; zlib still works
    _inflate_lib = zlib
    _INFLATE_ERRORS = (zlib.error,)

# Compressed input is pulled in chunks of this size.
READ_SIZE = 1 << 20

_GZIP_MAGIC = b"\x1f\x8b\x08"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# zstd skippable frames carry magics 0x184D2A50..0x184D2A5F (little-endian).
_ZSTD_SKIPPABLE_START = 0x184D2A50
_ZSTD_SKIPPABLE_MASK = 0xFFFFFFF0
# Enough bytes for every magic above.
_PEEK = 10


class Compression(enum.Enum):
    UNCOMPRESSED = "uncompressed"
    GZIP = "gzip"
    ZSTD = "zstd"

    @property
    def extension(self) -> str:
        return {"gzip": "gz", "zstd": "zst"}.get(self.value, "")


_LAYER_TYPES: dict[str, Compression] = {
    "application/vnd.oci.image.layer.v1.tar": Compression.UNCOMPRESSED,
    "application/vnd.oci.image.layer.v1.tar+gzip": Compression.GZIP,
    "application/vnd.oci.image.layer.v1.tar+zstd": Compression.ZSTD,
    "application/vnd.oci.image.layer.nondistributable.v1.tar": Compression.UNCOMPRESSED,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": Compression.GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": Compression.ZSTD,
    "application/vnd.docker.image.rootfs.diff.tar": Compression.UNCOMPRESSED,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": Compression.GZIP,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": Compression.GZIP,
}


def from_media_type(media_type: str) -> Compression:
    """The compression a layer media type announces; NotImplemented_ if it is no layer."""
    try:
        return _LAYER_TYPES[media_type]
    except KeyError:
        raise errdefs.NotImplemented_(f"unsupported layer media type {media_type!r}") from None


def is_layer_media_type(media_type: str) -> bool:
    return media_type in _LAYER_TYPES


def detect(head: bytes) -> Compression:
    """The compression of a stream that starts with ``head`` (a few bytes suffice)."""
    if head.startswith(_GZIP_MAGIC):
        return Compression.GZIP
    if head.startswith(_ZSTD_MAGIC):
        return Compression.ZSTD
    if len(head) >= 8:
        magic = int.from_bytes(head[:4], "little")
        if magic & _ZSTD_SKIPPABLE_MASK == _ZSTD_SKIPPABLE_START:
            return Compression.ZSTD
    return Compression.UNCOMPRESSED


class ByteSource(Protocol):
    """What a layer is read from: a file, or a wrapper that counts or hashes on the way."""

    def read(self, n: int = -1, /) -> bytes: ...


class Reader(Protocol):
    compression: Compression

    def read(self, n: int = -1) -> bytes: ...

    def close(self) -> None: ...


def open_stream(src: ByteSource, compression: Compression | None = None) -> Reader:
    """A reader of the decompressed bytes of ``src``.

    ``compression`` None means detect from the first bytes. Closing the reader
    does not close ``src``: its owner does that.
    """
    head = _read_full(src, _PEEK)
    if compression is None:
        compression = detect(head)
    if compression is Compression.GZIP:
        return _GzipReader(src, head)
    if compression is Compression.ZSTD:
        return _ZstdReader(src, head)
    return _PlainReader(src, head)


def _read_full(src: ByteSource, n: int) -> bytes:
    chunks: list[bytes] = []
    want = n
    while want > 0:
        chunk = src.read(want)
        if not chunk:
            break
        chunks.append(chunk)
        want -= len(chunk)
    return b"".join(chunks)


class _PlainReader:
    compression = Compression.UNCOMPRESSED

    def __init__(self, src: ByteSource, head: bytes) -> None:
        self._src = src
        self._head = head

    def read(self, n: int = -1) -> bytes:
        if self._head:
            head = self._head
            if 0 <= n < len(head):
                self._head = head[n:]
                return head[:n]
            self._head = b""
            if n < 0:
                return head + self._src.read()
            more = self._src.read(n - len(head)) if n > len(head) else b""
            return head + more if more else head
        return self._src.read(n)

    def close(self) -> None:
        self._head = b""


class _GzipReader:
    """RFC 1952 with several members back to back (pigz and Go's writer produce those)."""

    compression = Compression.GZIP

    def __init__(self, src: ByteSource, head: bytes) -> None:
        self._src = src
        self._pending = head  # compressed bytes not yet given to the inflater
        self._inflater = _inflate_lib.decompressobj(16 + zlib.MAX_WBITS)
        self._eof = False

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            parts = []
            while chunk := self.read(READ_SIZE):
                parts.append(chunk)
            return b"".join(parts)
        if n == 0:
            return b""
        while not self._eof:
            inflater = self._inflater
            if inflater.eof:
                pending, self._pending = self._pending, b""
                self._next_member(pending)
                continue
            data = inflater.unconsumed_tail
            if not data:
                data, self._pending = self._pending, b""
            if not data:
                data = self._src.read(READ_SIZE)
                if not data:
                    raise errdefs.InvalidArgument("gzip stream: unexpected end of data")
            try:
                out = inflater.decompress(data, n)
            except _INFLATE_ERRORS as exc:
                raise errdefs.InvalidArgument(f"gzip stream: {exc}") from None
            if inflater.eof:
                self._pending = inflater.unused_data
            if out:
                return out
        return b""

    def _next_member(self, data: bytes) -> None:
        # After a member ends, either the input ends or another member begins.
        if not data:
            data = self._src.read(READ_SIZE)
        if not data:
            self._eof = True
            return
        if len(data) < len(_GZIP_MAGIC):
            data += _read_full(self._src, len(_GZIP_MAGIC) - len(data))
        if not data.startswith(_GZIP_MAGIC):
            raise errdefs.InvalidArgument("gzip stream: trailing garbage after last member")
        self._inflater = _inflate_lib.decompressobj(16 + zlib.MAX_WBITS)
        self._pending = data

    def close(self) -> None:
        self._eof = True
        self._pending = b""


class _ZstdFrames:
    """Follows zstd frame boundaries (RFC 8878) in the compressed bytes going by.

    zstandard's stream reader returns a short stream, not an error, when the input
    stops inside a frame; this walk over frame and block headers tells the two
    apart without decompressing anything.
    """

    def __init__(self) -> None:
        self._buf = b""  # bytes of the header being parsed
        self._skip = 0  # bytes of content to pass over before the next header
        self._state = "magic"
        self._frame_has_checksum = False

    @property
    def at_boundary(self) -> bool:
        return self._state == "magic" and not self._buf and not self._skip

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._skip:
                step = min(self._skip, len(view))
                self._skip -= step
                view = view[step:]
                continue
            need = self._need()
            take = min(need - len(self._buf), len(view))
            self._buf += bytes(view[:take])
            view = view[take:]
            if len(self._buf) == need:
                self._advance()

    def _need(self) -> int:
        state = self._state
        if state in ("magic", "skippable_size"):
            return 4
        if state == "frame_header":
            return 1
        if state == "frame_header_rest":
            return self._header_rest
        return 3  # block header

    def _advance(self) -> None:
        buf, self._buf = self._buf, b""
        state = self._state
        if state == "magic":
            magic = int.from_bytes(buf, "little")
            if magic == 0xFD2FB528:
                self._state = "frame_header"
            elif magic & _ZSTD_SKIPPABLE_MASK == _ZSTD_SKIPPABLE_START:
                self._state = "skippable_size"
            else:
                raise errdefs.InvalidArgument("zstd stream: unknown frame magic")
        elif state == "skippable_size":
            self._skip = int.from_bytes(buf, "little")
            self._state = "magic"
        elif state == "frame_header":
            descriptor = buf[0]
            fcs_flag = descriptor >> 6
            single_segment = bool(descriptor & 0x20)
            self._frame_has_checksum = bool(descriptor & 0x04)
            fcs_size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
            dict_size = (0, 1, 2, 4)[descriptor & 0x03]
            self._header_rest = (0 if single_segment else 1) + dict_size + fcs_size
            self._state = "frame_header_rest" if self._header_rest else "block"
        elif state == "frame_header_rest":
            self._state = "block"
        else:
            header = int.from_bytes(buf, "little")
            last = header & 1
            block_type = (header >> 1) & 3
            size = header >> 3
            if block_type == 3:
                raise errdefs.InvalidArgument("zstd stream: reserved block type")
            self._skip = 1 if block_type == 1 else size
            if last:
                self._skip += 4 if self._frame_has_checksum else 0
                self._state = "magic"


class _CheckedSource:
    """Gives back the peeked bytes, then the rest of ``src``, watching frames go by."""

    def __init__(self, src: ByteSource, head: bytes) -> None:
        self._src = src
        self._head = head
        self.frames = _ZstdFrames()

    def read(self, n: int = -1) -> bytes:
        if self._head:
            data, self._head = self._head, b""
        else:
            data = self._src.read(n)
        self.frames.feed(data)
        return data


class _ZstdReader:
    compression = Compression.ZSTD

    def __init__(self, src: ByteSource, head: bytes) -> None:
        self._source = _CheckedSource(src, head)
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            # zstandard reads any object with read(n) (its docs say so); its stub asks
            # for a whole IO[bytes].
            self._source,  # type: ignore[arg-type]
            read_size=READ_SIZE,
            read_across_frames=True,
            closefd=False,
        )

    def read(self, n: int = -1) -> bytes:
        try:
            data = self._reader.read(n)
        except zstandard.ZstdError as exc:
            raise errdefs.InvalidArgument(f"zstd stream: {exc}") from None
        if not data and n != 0 and not self._source.frames.at_boundary:
            raise errdefs.InvalidArgument("zstd stream: unexpected end of data")
        return data

    def close(self) -> None:
        self._reader.close()
