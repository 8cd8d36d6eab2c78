"""``berth.core.runtime.taskwire`` against betterproto's generated classes, the reference:
requests encode to the same bytes; an answer the readers accept reads to the same values
as ``cls().parse``, on well-formed messages and on any bytes (else the reader steps back)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from betterproto.lib.google.protobuf import Any as AnyMsg
from hypothesis import given, settings, strategies as st

from berth.core.api.containerd.task import v2
from berth.core.api.containerd.types import Mount
from berth.core.api.containerd.v1.types import Status
from berth.core.protowire import encode_varint
from berth.core.runtime import taskwire

ids = st.text(max_size=12)
u32 = st.integers(0, 0xFFFFFFFF)
# Whole microseconds from the epoch to 9999 (what betterproto gives back exactly).
times = st.integers(0, 253402300799 * 10**6 + 999999).map(
    lambda us: datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us))


@settings(max_examples=200, deadline=None)
@given(task_id=ids, exec_id=ids)
def test_id_requests_encode_as_the_generated_classes(task_id, exec_id):
    want = taskwire.id_request(task_id, exec_id)
    for cls in (v2.StartRequest, v2.WaitRequest, v2.StateRequest, v2.DeleteRequest):
        assert bytes(cls(id=task_id, exec_id=exec_id)) == want
    assert bytes(v2.ConnectRequest(id=task_id)) == taskwire.id_request(task_id)
    assert bytes(v2.ShutdownRequest(id=task_id)) == taskwire.id_request(task_id)


def _reference(cls, data):
    try:
        return "ok", cls().parse(data)
    except Exception as e:  # noqa: BLE001 - only that it fails matters
        return "error", type(e)


def _same_exit(got, want, pid: bool) -> None:
    assert type(got.status) is int and type(got.exited_at) is datetime
    assert (got.pid, got.status, got.exited_at) == (want.pid if pid else 0, want.exit_status,
                                                   want.exited_at)
    assert got.exited_at.tzinfo == want.exited_at.tzinfo


def check(data: bytes) -> None:
    """Each reader on ``data``: None, or what betterproto reads."""
    for cls, read in ((v2.CreateTaskResponse, taskwire.read_pid), (v2.StartResponse,
                                                                taskwire.read_pid)):
        got = read(data)
        if got is not None:
            kind, want = _reference(cls, data)
            assert kind == "ok" and got == want.pid and type(got) is int
    got_wait = taskwire.read_wait(data)
    if got_wait is not None:
        kind, want = _reference(v2.WaitResponse, data)
        assert kind == "ok"
        _same_exit(got_wait, want, pid=False)
    got_delete = taskwire.read_delete(data)
    if got_delete is not None:
        kind, want = _reference(v2.DeleteResponse, data)
        assert kind == "ok"
        _same_exit(got_delete, want, pid=True)
    got_state = taskwire.read_state(data)
    if got_state is not None:
        kind, want = _reference(v2.StateResponse, data)
        assert kind == "ok"
        for name in taskwire.TaskState._fields:
            a, b = getattr(got_state, name), getattr(want, name)
            assert a == b and type(a) is type(b), (name, a, b)


@settings(max_examples=300, deadline=None)
@given(pid=u32, status=u32, when=st.one_of(st.none(), times))
def test_well_formed_exits_read_alike(pid, status, when):
    wait = v2.WaitResponse(exit_status=status)
    delete = v2.DeleteResponse(pid=pid, exit_status=status)
    if when is not None:
        wait.exited_at = delete.exited_at = when
    assert taskwire.read_wait(bytes(wait)) is not None
    assert taskwire.read_delete(bytes(delete)) is not None
    assert taskwire.read_pid(bytes(v2.StartResponse(pid=pid))) == pid
    check(bytes(wait))
    check(bytes(delete))


@settings(max_examples=300, deadline=None)
@given(strings=st.lists(ids, min_size=6, max_size=6), pid=u32, code=u32,
       status=st.sampled_from(list(Status) + [7, 99]), terminal=st.booleans(),
       when=times)
def test_well_formed_states_read_alike(strings, pid, code, status, terminal, when):
    msg = v2.StateResponse(id=strings[0], bundle=strings[1], pid=pid, status=status,
                        stdin=strings[2], stdout=strings[3], stderr=strings[4],
                        terminal=terminal, exit_status=code, exited_at=when,
                        exec_id=strings[5])
    assert (taskwire.read_state(bytes(msg)) is not None) == (status in list(Status))
    check(bytes(msg))


@st.composite
def _messages(draw) -> bytes:
    """Field soup: the readers' field numbers with right and wrong wire types,
    out-of-range numbers, bad UTF-8, odd timestamps, repeats and truncation."""
    out = b""
    for _ in range(draw(st.integers(0, 6))):
        number = draw(st.sampled_from([1, 2, 3, 4, 8, 9, 10, 11, 12, 99]))
        wire = draw(st.sampled_from([0, 0, 2, 2, 1, 5]))
        out += encode_varint(number << 3 | wire)
        if wire == 0:
            out += encode_varint(draw(st.one_of(
                st.integers(0, 3), st.integers(0, (1 << 64) - 1),
                st.sampled_from([1 << 32, (1 << 32) - 1, 1 << 63, (1 << 64) - 1]))))
        elif wire == 2:
            if draw(st.booleans()):
                ts = b""
                for _ in range(draw(st.integers(0, 3))):
                    field = draw(st.sampled_from([0x08, 0x10, 0x18, 0x0a]))
                    ts += bytes([field]) + encode_varint(draw(st.one_of(
                        st.integers(0, 2 * 10**9), st.integers(0, (1 << 64) - 1))))
                body = ts
            else:
                body = draw(st.one_of(st.text(max_size=10).map(str.encode),
                                      st.binary(max_size=10)))
            out += encode_varint(len(body)) + body
        elif wire == 1:
            out += draw(st.binary(min_size=8, max_size=8))
        else:
            out += draw(st.binary(min_size=4, max_size=4))
    if out and draw(st.booleans()):
        out = out[:draw(st.integers(0, len(out)))]
    return out


@settings(max_examples=500, deadline=None)
@given(data=_messages())
def test_structured_soup_reads_alike_or_steps_back(data):
    check(data)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=48))
def test_any_bytes_read_alike_or_step_back(data):
    check(data)


def test_unset_fields_read_as_defaults():
    assert taskwire.read_wait(b"") is not None
    check(b"")
    state = taskwire.read_state(b"")
    assert state == taskwire.TaskState()
    assert state.exited_at == v2.StateResponse().exited_at


mounts = st.lists(st.builds(Mount, type=ids, source=ids, target=ids,
                            options=st.lists(st.text(max_size=8), max_size=3)), max_size=3)
anys = st.one_of(st.none(), st.builds(AnyMsg, type_url=ids, value=st.binary(max_size=8)),
                 st.just(AnyMsg()))


@settings(max_examples=300, deadline=None)
@given(task_id=ids, bundle=ids, rootfs=mounts, terminal=st.booleans(),
       stdio=st.lists(st.text(max_size=8), min_size=4, max_size=4), options=anys)
def test_create_requests_encode_as_the_generated_class(task_id, bundle, rootfs, terminal,
                                                       stdio, options):
    stdin, stdout, stderr, checkpoint = stdio
    kw = {"terminal": terminal, "stdin": stdin, "stdout": stdout, "stderr": stderr,
          "checkpoint": checkpoint, "options": options}
    got = taskwire._write_create(task_id, bundle, rootfs, **kw)
    req = taskwire.create_message(task_id, bundle, rootfs, **kw)
    assert taskwire.create_request(task_id, bundle, rootfs, **kw) == bytes(req)
    # containerd's runtime passes each mount's type, source and options on, no target.
    assert [(m.type, m.source, m.options, m.target) for m in req.rootfs] == [
        (m.type, m.source, m.options, "") for m in rootfs]
    assert (req.id, req.bundle, req.stdin, req.stdout, req.stderr, req.terminal,
            req.checkpoint) == (task_id, bundle, stdin, stdout, stderr, terminal, checkpoint)
    if got is None:
        assert options is not None and not options.type_url and not options.value
        return
    assert got == bytes(req)
    assert v2.CreateTaskRequest().parse(got) == req


def test_create_request_of_a_surrogate_is_left_to_betterproto():
    assert taskwire._write_create("t", "/b", [], terminal=False, stdin="\udc80", stdout="",
                                  stderr="", checkpoint="", options=None) is None
