"""core/api must be what proto/generate.py makes of proto/, and must speak containerd's wire."""

import subprocess
import sys
from pathlib import Path

from berth.core.api import ttrpc
from berth.core.api.berth.services.eventlog import v1 as eventlog
from berth.core.api.containerd import events
from berth.core.api.containerd.services.events import v1 as events_v1
from berth.core.api.containerd.services.images import v1 as images
from berth.core.api.containerd.services.namespaces import v1 as namespaces
from berth.core.api.containerd.task import v2 as shim
from berth.core.api.google import rpc

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "core" / "api"


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_committed_api_matches_a_fresh_generation(tmp_path: Path) -> None:
    out = tmp_path / "api"
    subprocess.run(
        [sys.executable, str(REPO / "proto" / "generate.py"), "--out", str(out)],
        check=True,
    )
    fresh, committed = _tree(out), _tree(COMMITTED)
    assert fresh, "generator produced nothing"
    assert sorted(fresh) == sorted(committed), "core/api is stale: run `tox -e proto`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"core/api is stale, differing files: {stale}; run `tox -e proto`"


def test_namespace_encodes_with_containerd_field_numbers() -> None:
    message = namespaces.Namespace(name="a", labels={"k": "v"})
    # name = 1 (string); labels = 2 as a map entry {key = 1, value = 2}
    expected = b"\x0a\x01a" + b"\x12\x06" + b"\x0a\x01k" + b"\x12\x01v"
    assert bytes(message) == expected
    assert namespaces.Namespace().parse(expected) == message


def test_ttrpc_request_and_response_layout() -> None:
    request = ttrpc.Request(
        service="containerd.task.v2.Task",
        method="State",
        payload=bytes(shim.StateRequest(id="c1")),
        timeout_nano=1,
        metadata=[ttrpc.KeyValue(key="k", value="v")],
    )
    assert bytes(request) == (
        b"\x0a\x17containerd.task.v2.Task"
        + b"\x12\x05State"
        + b"\x1a\x04\x0a\x02c1"
        + b"\x20\x01"
        + b"\x2a\x06\x0a\x01k\x12\x01v"
    )
    response = ttrpc.Response(status=rpc.Status(code=5, message="x"), payload=b"")
    assert bytes(response) == b"\x0a\x05\x08\x05\x12\x01x"
    assert ttrpc.Response().parse(bytes(response)).status.code == 5


def test_sparse_field_numbers_are_kept() -> None:
    # containerd skips numbers in places; getting one wrong silently loses data on the wire.
    image = images.Image(name="n")
    image.created_at = image.created_at.replace(year=2000)
    assert bytes(image)[3] >> 3 == 7  # created_at is field 7, after name's 3 bytes
    exit_event = events.TaskExit(container_id="c", exit_status=1)
    assert bytes(exit_event) == b"\x0a\x01c\x20\x01"


def test_eventlog_wraps_the_containerd_envelope() -> None:
    envelope = events_v1.Envelope(namespace="default", topic="/tasks/exit")
    sequenced = eventlog.SequencedEnvelope(seq=7, envelope=envelope)
    decoded = eventlog.SequencedEnvelope().parse(bytes(sequenced))
    assert decoded.seq == 7
    assert decoded.envelope.topic == "/tasks/exit"
    assert bytes(sequenced).startswith(b"\x08\x07\x12")
