"""FastTarInfo decodes every header exactly as tarfile's own TarInfo does.

Headers of every format tarfile writes (ustar with a prefix, GNU with base-256 numbers
and long names, PAX), a V7 directory and an old-GNU sparse header, each also damaged
at random (with and without a fixed-up checksum): the fast decoder must give the same
fields, or fail with the same error, every time.
"""

from __future__ import annotations

import io
import random
import tarfile

import pytest

from berth.plugins.differ.tarheader import FastTarInfo

FIELDS = ("name", "mode", "uid", "gid", "size", "mtime", "chksum", "type", "linkname",
          "uname", "gname", "devmajor", "devminor")


def decode(cls: type[tarfile.TarInfo], buf: bytes) -> tuple[object, ...]:
    try:
        info = cls.frombuf(buf, "utf-8", "surrogateescape")
    except Exception as e:  # the error is what is compared
        return ("error", type(e), str(e))
    return tuple(getattr(info, f) for f in FIELDS) + (
        getattr(info, "_sparse_structs", None),)


def archive(fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, kind, extra in [
            ("etc/", tarfile.DIRTYPE, {}),
            ("etc/passwd", tarfile.REGTYPE, {"size": 0, "mode": 0o4755}),
            ("d" * 120 + "/file", tarfile.REGTYPE, {}),  # ustar prefix, or a long name
            ("dev/null", tarfile.CHRTYPE, {"devmajor": 1, "devminor": 3}),
            ("bin/sh", tarfile.SYMTYPE, {"linkname": "busybox"}),
            ("bin/ls", tarfile.LNKTYPE, {"linkname": "bin/busybox"}),
            ("fifo", tarfile.FIFOTYPE, {"uname": "user", "gname": "group"}),
            ("big", tarfile.REGTYPE, {"uid": 3_000_000, "gid": 70_000}),
            ("old", tarfile.REGTYPE, {"mtime": -1}),
            ("naïve", tarfile.REGTYPE, {}),
        ]:
            if fmt == tarfile.USTAR_FORMAT and name in ("old", "naïve", "big"):
                continue  # ustar cannot hold these
            info = tarfile.TarInfo(name)
            info.type, info.mtime = kind, 1704067200
            for k, v in extra.items():
                setattr(info, k, v)
            tar.addfile(info)
    return buf.getvalue()


def headers() -> list[bytes]:
    out = []
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        data = archive(fmt)
        out += [data[i:i + 512] for i in range(0, len(data), 512)]  # end blocks too
    v7 = bytearray(out[0])
    v7[156:157] = tarfile.AREGTYPE
    sparse = bytearray(out[1])
    sparse[156:157] = tarfile.GNUTYPE_SPARSE
    sparse[386:410] = b"%011o\0%011o\0" % (0, 512)
    for h in (v7, sparse):
        out.append(with_checksum(h))
    return out


def with_checksum(h: bytearray) -> bytes:
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def test_same_fields_as_tarfile_for_every_format() -> None:
    hs = headers()
    assert len(hs) > 30
    for h in hs:
        assert decode(FastTarInfo, h) == decode(tarfile.TarInfo, h), h


@pytest.mark.parametrize("seed", range(4))
def test_same_result_as_tarfile_for_damaged_headers(seed: int) -> None:
    rng = random.Random(seed)
    values = [0, 0x20, 0x30, 0x37, 0x38, 0x2B, 0x5F, 0x80, 0xFF, 0x09]
    for h in headers():
        for _ in range(60):
            m = bytearray(h)
            for _ in range(rng.randint(1, 4)):
                pos = rng.randrange(512)
                m[pos] = rng.choice(values) if rng.random() < 0.7 else rng.randrange(256)
            raw = bytes(m)
            assert decode(FastTarInfo, raw) == decode(tarfile.TarInfo, raw), raw
            fixed = with_checksum(bytearray(raw))
            assert decode(FastTarInfo, fixed) == decode(tarfile.TarInfo, fixed), fixed


def test_short_and_empty_blocks_fail_as_in_tarfile() -> None:
    for buf in (b"", b"x" * 100, bytes(512)):
        got = decode(FastTarInfo, buf)
        assert got == decode(tarfile.TarInfo, buf)
        assert got[0] == "error"


def test_reading_an_archive_gives_the_same_members() -> None:
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        data = archive(fmt)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|",
                          tarinfo=FastTarInfo) as fast, \
                tarfile.open(fileobj=io.BytesIO(data), mode="r|") as slow:
            got = [(m.name, m.type, m.size, m.uid, m.linkname, m.pax_headers) for m in fast]
            want = [(m.name, m.type, m.size, m.uid, m.linkname, m.pax_headers) for m in slow]
        assert got == want and len(got) >= 7
