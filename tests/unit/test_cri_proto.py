"""proto/runtime/v1/api.proto speaks upstream CRI's wire: every message, field number,
field type, enum value and RPC matches the facts in cri_api_facts.txt (taken from
kubernetes' cri-api api.proto, kept here independently of our .proto)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2

from berth.core.api.runtime import v1 as cri

REPO = Path(__file__).resolve().parents[2]
FACTS = Path(__file__).with_name("cri_api_facts.txt")
PROTO = "runtime/v1/api.proto"
F = descriptor_pb2.FieldDescriptorProto

_SCALARS = {
    F.TYPE_STRING: "string", F.TYPE_BOOL: "bool", F.TYPE_INT32: "int32",
    F.TYPE_INT64: "int64", F.TYPE_UINT32: "uint32", F.TYPE_UINT64: "uint64",
    F.TYPE_BYTES: "bytes",
}


def _facts() -> tuple[dict[str, dict[str, str]], dict[str, dict[str, int]],
                      dict[str, dict[str, str]]]:
    messages: dict[str, dict[str, str]] = {}
    enums: dict[str, dict[str, int]] = {}
    services: dict[str, dict[str, str]] = {}
    for line in FACTS.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        words = line.split()
        if words[0] == "enum":
            enums[words[1]] = {k: int(v) for k, v in (w.split("=") for w in words[2:])}
        elif words[0] == "service":
            services[words[1]] = {w.split("(")[0]: w for w in words[2:]}
        else:
            messages[words[0]] = dict(w.split("=", 1) for w in words[1:])
    return messages, enums, services


def _descriptor(tmp: Path) -> descriptor_pb2.FileDescriptorProto:
    out = tmp / "set.pb"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"--proto_path={REPO / 'proto'}",
         f"--descriptor_set_out={out}", PROTO],
        check=True,
    )
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    (file,) = [f for f in fds.file if f.name == PROTO]
    assert file.package == "runtime.v1"
    return file


def _walk(file: descriptor_pb2.FileDescriptorProto):
    """(qualified name, message) for every message, nested ones with a dotted name;
    map entry messages are folded into their field's type."""
    def visit(prefix: str, msg: descriptor_pb2.DescriptorProto):
        name = prefix + msg.name
        yield name, msg
        for nested in msg.nested_type:
            if not nested.options.map_entry:
                yield from visit(name + ".", nested)
    for msg in file.message_type:
        yield from visit("", msg)


def _type(field: descriptor_pb2.FieldDescriptorProto, msg: descriptor_pb2.DescriptorProto
          ) -> str:
    if field.type == F.TYPE_MESSAGE:
        short = field.type_name.removeprefix(".runtime.v1.")
        entry = next((n for n in msg.nested_type
                      if n.options.map_entry and short.endswith("." + n.name)), None)
        if entry is not None:
            k, v = entry.field
            assert (k.type, v.type) == (F.TYPE_STRING, F.TYPE_STRING), field.name
            return "{}"
        kind = short
    elif field.type == F.TYPE_ENUM:
        kind = field.type_name.removeprefix(".runtime.v1.")
    else:
        kind = _SCALARS[field.type]
    return "[]" + kind if field.label == F.LABEL_REPEATED else kind


def test_every_message_and_field_matches_upstream(tmp_path: Path) -> None:
    messages, enums, _ = _facts()
    file = _descriptor(tmp_path)
    ours = {}
    our_enums = {e.name: {v.name: v.number for v in e.value} for e in file.enum_type}
    for name, msg in _walk(file):
        ours[name] = {f.name: f"{f.number}:{_type(f, msg)}" for f in msg.field}
        for e in msg.enum_type:
            our_enums[f"{name}.{e.name}"] = {v.name: v.number for v in e.value}
    assert sorted(ours) == sorted(messages)
    for name, fields in messages.items():
        assert ours[name] == fields, name
    assert our_enums == enums


def test_every_rpc_matches_upstream(tmp_path: Path) -> None:
    _, _, services = _facts()
    file = _descriptor(tmp_path)
    ours = {}
    for svc in file.service:
        ours[svc.name] = {}
        for m in svc.method:
            assert not m.client_streaming
            out = m.output_type.removeprefix(".runtime.v1.")
            arrow = f"stream:{out}" if m.server_streaming else out
            ours[svc.name][m.name] = (
                f"{m.name}({m.input_type.removeprefix('.runtime.v1.')})->{arrow}")
    assert ours == services


def test_generated_code_encodes_upstream_field_numbers() -> None:
    # ImageSpec: image = 1 (string), user_specified_image = 18, runtime_handler = 19.
    spec = cri.ImageSpec(image="a", user_specified_image="b", runtime_handler="c")
    assert bytes(spec) == b"\x0a\x01a" + b"\x92\x01\x01b" + b"\x9a\x01\x01c"
    # ContainerConfig.CDI_devices = 17, a repeated message.
    cfg = cri.ContainerConfig(cdi_devices=[cri.CdiDevice(name="x")])
    assert bytes(cfg) == b"\x8a\x01\x03\x0a\x01x"
    assert cri.ContainerConfig().parse(bytes(cfg)) == cfg
