"""The containerd.task.v2 messages berthd sends and reads on every container, sans-io.

Each ``ctr run`` makes berthd call its shim's Start, Wait, State, Delete and Shutdown,
whose requests are a task id and an exec id and whose answers are a few numbers, strings
and a timestamp. A generated betterproto message costs tens of microseconds to build
(a hook on every field set): ~25 us per request built and encoded, 20-70 us per answer
read (StateResponse: 70). Here requests are written straight to the wire and answers
read into plain values.

The readers are sure or they step back: an unknown or repeated field, an unexpected
wire type, a number out of its type's range, bad UTF-8 or a timestamp outside what
``datetime`` holds returns None, and the caller reads the message with betterproto,
which stays the reference (tests/unit/test_runtime_taskwire.py compares the two on
any bytes).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from betterproto.lib.google.protobuf import Any as AnyMsg

from berth.core.api.containerd.task.v2 import CreateTaskRequest
from berth.core.api.containerd.types import Mount
from berth.core.api.containerd.v1.types import Status
from berth.core.oci.reaper import Exit
from berth.core.protowire import DecodeError, encode_varint, read_varint

_UINT32_MAX = 0xFFFFFFFF
# What a protobuf Timestamp may hold (0001-01-01 to 9999-12-31) and datetime can show;
# earlier than the epoch is left to betterproto.
_MAX_SECONDS = 253402300799
_NANOS = 10**9
# A Timestamp field left unset reads as the epoch, as betterproto's default.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Field kinds of the answers read here.
_U32, _BOOL, _STR, _TIME = range(4)
_VARINT, _LEN = 0, 2


def id_request(task_id: str, exec_id: str = "") -> bytes:
    """A request of a task id (field 1) and an exec id (field 2): Start, Wait, State,
    Delete, Connect and Shutdown (``now`` false) take this shape. Empty strings are
    left out, as proto3 leaves out default values."""
    out = b""
    if task_id:
        raw = task_id.encode()
        out += b"\x0a" + encode_varint(len(raw)) + raw
    if exec_id:
        raw = exec_id.encode()
        out += b"\x12" + encode_varint(len(raw)) + raw
    return out


def create_request(task_id: str, bundle: str, rootfs: Sequence[Mount], *, terminal: bool,
                   stdin: str, stdout: str, stderr: str, checkpoint: str,
                   options: AnyMsg | None) -> bytes:
    """A CreateTaskRequest as containerd's runtime sends it (each rootfs mount's type,
    source and options, no target), encoded."""
    raw = _write_create(task_id, bundle, rootfs, terminal=terminal, stdin=stdin,
                        stdout=stdout, stderr=stderr, checkpoint=checkpoint, options=options)
    if raw is None:
        raw = bytes(create_message(task_id, bundle, rootfs, terminal=terminal, stdin=stdin,
                                   stdout=stdout, stderr=stderr, checkpoint=checkpoint,
                                   options=options))
    return raw


def _write_create(task_id: str, bundle: str, rootfs: Sequence[Mount], *, terminal: bool,
                  stdin: str, stdout: str, stderr: str, checkpoint: str,
                  options: AnyMsg | None) -> bytes | None:
    """``create_request`` without betterproto; None when it is better left to it (an
    options message with nothing in it, a string that is not UTF-8)."""
    try:
        parts = [_len(0x0A, task_id.encode()), _len(0x12, bundle.encode())]
        for m in rootfs:
            inner = [_len(0x0A, m.type.encode()), _len(0x12, m.source.encode())]
            inner += [_len(0x22, o.encode(), always=True) for o in m.options]
            parts.append(_len(0x1A, b"".join(inner), always=True))
        if terminal:
            parts.append(b"\x20\x01")
        parts += [_len(0x2A, stdin.encode()), _len(0x32, stdout.encode()),
                  _len(0x3A, stderr.encode()), _len(0x42, checkpoint.encode())]
        if options is not None:
            value = _len(0x0A, options.type_url.encode()) + _len(0x12, options.value)
            if not value:
                return None
            parts.append(_len(0x52, value))
    except UnicodeEncodeError:
        return None
    return b"".join(parts)


def create_message(task_id: str, bundle: str, rootfs: Sequence[Mount], *, terminal: bool,
                   stdin: str, stdout: str, stderr: str, checkpoint: str,
                   options: AnyMsg | None) -> CreateTaskRequest:
    """The same request as the generated class (the reference, and the way for what
    ``create_request`` leaves to betterproto)."""
    req = CreateTaskRequest(id=task_id, bundle=bundle,
                            rootfs=[Mount(type=m.type, source=m.source, options=m.options)
                                    for m in rootfs],
                            stdin=stdin, stdout=stdout, stderr=stderr, terminal=terminal,
                            checkpoint=checkpoint)
    if options is not None:
        req.options = options
    return req


def _len(tag: int, raw: bytes, *, always: bool = False) -> bytes:
    """A length-delimited field; an empty one is left out unless ``always``."""
    if not raw and not always:
        return b""
    return bytes((tag,)) + encode_varint(len(raw)) + raw


class TaskState(NamedTuple):
    """A StateResponse's fields, as plain values."""

    id: str = ""
    bundle: str = ""
    pid: int = 0
    # Status(member): betterproto's enum members look like plain ints to mypy (#616).
    status: Status = Status(Status.UNKNOWN)
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False
    exit_status: int = 0
    exited_at: datetime = EPOCH
    exec_id: str = ""


_PID = {1: _U32}  # CreateTaskResponse, StartResponse
_WAIT = {1: _U32, 2: _TIME}  # WaitResponse: exit_status, exited_at
_DELETE = {1: _U32, 2: _U32, 3: _TIME}  # DeleteResponse: pid, exit_status, exited_at
_STATE = {1: _STR, 2: _STR, 3: _U32, 4: _U32, 5: _STR, 6: _STR, 7: _STR, 8: _BOOL,
          9: _U32, 10: _TIME, 11: _STR}


def read_pid(data: bytes) -> int | None:
    """``pid`` of a CreateTaskResponse or StartResponse."""
    fields = _read(data, _PID)
    return None if fields is None else fields.get(1, 0)


def read_wait(data: bytes) -> Exit | None:
    """A WaitResponse as an Exit (pid 0: the answer carries none)."""
    fields = _read(data, _WAIT)
    if fields is None:
        return None
    return Exit(pid=0, status=fields.get(1, 0), exited_at=fields.get(2, EPOCH))


def read_delete(data: bytes) -> Exit | None:
    """A DeleteResponse as an Exit."""
    fields = _read(data, _DELETE)
    if fields is None:
        return None
    return Exit(pid=fields.get(1, 0), status=fields.get(2, 0),
                exited_at=fields.get(3, EPOCH))


_STATUSES: dict[int, Status] = {int(s): s for s in Status}


def read_state(data: bytes) -> TaskState | None:
    fields = _read(data, _STATE)
    if fields is None:
        return None
    status = _STATUSES.get(fields.get(4, 0))
    if status is None:
        return None  # a status this berth does not know: betterproto's way
    return TaskState(
        id=fields.get(1, ""), bundle=fields.get(2, ""), pid=fields.get(3, 0),
        status=status, stdin=fields.get(5, ""),
        stdout=fields.get(6, ""), stderr=fields.get(7, ""), terminal=fields.get(8, False),
        exit_status=fields.get(9, 0), exited_at=fields.get(10, EPOCH),
        exec_id=fields.get(11, ""),
    )


def _read(data: bytes, layout: dict[int, int]) -> dict[int, Any] | None:
    """The fields of ``data`` by number, each of the kind ``layout`` gives; None when
    the message holds anything else."""
    out: dict[int, Any] = {}
    pos, end = 0, len(data)
    try:
        while pos < end:
            key, pos = read_varint(data, pos, end)
            number = key >> 3
            kind = layout.get(number)
            if kind is None or number in out:
                return None
            if kind == _U32 or kind == _BOOL:
                if key & 7 != _VARINT:
                    return None
                value, pos = read_varint(data, pos, end)
                if kind == _U32:
                    if value > _UINT32_MAX:
                        return None
                    out[number] = value
                else:
                    if value > 1:
                        return None
                    out[number] = value == 1
                continue
            if key & 7 != _LEN:
                return None
            size, pos = read_varint(data, pos, end)
            if size > end - pos:
                return None
            raw = data[pos:pos + size]
            pos += size
            if kind == _STR:
                out[number] = raw.decode()
            else:
                when = _timestamp(raw)
                if when is None:
                    return None
                out[number] = when
    except (DecodeError, UnicodeDecodeError):
        return None
    return out


def _timestamp(data: bytes) -> datetime | None:
    """A google.protobuf.Timestamp (seconds: field 1, nanos: field 2), from the epoch
    on, as betterproto turns it into a datetime (microseconds, rounded down)."""
    seconds = nanos = 0
    seen = 0
    pos, end = 0, len(data)
    while pos < end:
        key, pos = read_varint(data, pos, end)
        if key not in (0x08, 0x10) or seen & key:
            return None
        seen |= key
        value, pos = read_varint(data, pos, end)
        if key == 0x08:
            if value > _MAX_SECONDS:
                return None
            seconds = value
        else:
            if value >= _NANOS:
                return None
            nanos = value
    return EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)
