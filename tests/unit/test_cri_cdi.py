"""CDI devices: spec files (JSON and YAML) read from the spec folders, names resolved,
container edits made on a copy of the OCI spec; bad files and names refused clearly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from berth.core import errdefs
from berth.core.api.runtime import v1 as cri
from berth.core.oci import default_spec as oci
from berth.plugins.cri import cdi
from berth.plugins.cri.config import parse

YAML_SPEC = """\
cdiVersion: "0.6.0"
kind: example.com/probe
containerEdits:
  env: ["FROM_SPEC=1"]
devices:
  - name: null0
    containerEdits:
      env: ["PROBE_DEVICE=null0", "PATH=/cdi/bin"]
      deviceNodes:
        - path: /dev/probe-null
          hostPath: /dev/null
          permissions: rw
      mounts:
        - hostPath: /etc
          containerPath: /cdi/etc
          options: [ro, rbind]
      hooks:
        - hookName: createContainer
          path: /bin/true
          args: ["true", "x"]
          timeout: 5
      additionalGids: [44]
"""


def _base_spec() -> dict:
    return oci.default_unix_spec("k8s.io", "c1")


def _dirs(tmp: Path) -> tuple[Path, Path]:
    a, b = tmp / "etc-cdi", tmp / "run-cdi"
    a.mkdir()
    b.mkdir()
    return a, b


def test_inject_edits_from_yaml_and_json(tmp_path: Path) -> None:
    a, b = _dirs(tmp_path)
    (a / "probe.yaml").write_text(YAML_SPEC)
    (b / "other.json").write_text(json.dumps({
        "cdiVersion": "0.5.0", "kind": "example.com/other",
        "devices": [{"name": "zero", "containerEdits": {"deviceNodes": [
            {"path": "/dev/zero", "type": "c", "major": 1, "minor": 5}]}}]}))
    spec = _base_spec()
    before = json.dumps(spec, sort_keys=True)
    out = cdi.inject(spec, ["example.com/probe=null0", "example.com/other=zero"],
                     [str(a), str(b)])
    assert json.dumps(spec, sort_keys=True) == before  # the input is left alone
    env = out["process"]["env"]
    assert "PROBE_DEVICE=null0" in env and "FROM_SPEC=1" in env and "PATH=/cdi/bin" in env
    assert sum(e.startswith("PATH=") for e in env) == 1
    st_null = os.stat("/dev/null")
    node = next(d for d in out["linux"]["devices"] if d["path"] == "/dev/probe-null")
    assert (node["type"], node["major"], node["minor"]) == (
        "c", os.major(st_null.st_rdev), os.minor(st_null.st_rdev))
    assert {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"} in \
        out["linux"]["resources"]["devices"]
    assert any(d["path"] == "/dev/zero" and d["minor"] == 5 for d in out["linux"]["devices"])
    m = next(m for m in out["mounts"] if m["destination"] == "/cdi/etc")
    assert m == {"destination": "/cdi/etc", "type": "bind", "source": "/etc",
                 "options": ["ro", "rbind"]}
    depth = [len(Path(x["destination"]).parts) for x in out["mounts"]]
    assert depth == sorted(depth)
    assert out["hooks"]["createContainer"] == [{"path": "/bin/true", "args": ["true", "x"],
                                                "timeout": 5}]
    assert 44 in out["process"]["user"]["additionalGids"]


def test_unknown_conflicting_and_overridden_devices(tmp_path: Path) -> None:
    a, b = _dirs(tmp_path)
    (a / "probe.yaml").write_text(YAML_SPEC)
    (a / "broken.json").write_text("{nope")
    os.mkfifo(a / "fifo.json")  # skipped, never waited on
    with pytest.raises(errdefs.InvalidArgument, match="unresolvable CDI devices "
                       "example.com/probe=nope .2 spec file"):
        cdi.inject(_base_spec(), ["example.com/probe=null0", "example.com/probe=nope"],
                   [str(a), str(b)])
    for bad in ("probe=null0", "example.com/probe", "example.com/probe=", "/x=y",
                "example.com/a/b=c"):
        with pytest.raises(errdefs.InvalidArgument, match="qualified name"):
            cdi.inject(_base_spec(), [bad], [str(a)])
    # Twice in one folder: a conflict; a later folder overrides both.
    (a / "again.yaml").write_text(YAML_SPEC)
    with pytest.raises(errdefs.InvalidArgument, match="more than once"):
        cdi.inject(_base_spec(), ["example.com/probe=null0"], [str(a)])
    (b / "win.json").write_text(json.dumps({
        "cdiVersion": "0.6.0", "kind": "example.com/probe",
        "devices": [{"name": "null0", "containerEdits": {"env": ["WON=yes"]}}]}))
    out = cdi.inject(_base_spec(), ["example.com/probe=null0"], [str(a), str(b)])
    assert "WON=yes" in out["process"]["env"] and "FROM_SPEC=1" not in out["process"]["env"]
    # An edit that cannot be made fails the whole injection.
    (b / "win.json").write_text(json.dumps({
        "cdiVersion": "0.6.0", "kind": "example.com/probe",
        "devices": [{"name": "null0", "containerEdits": {
            "env": ["OK=1"], "deviceNodes": [{"path": "/dev/x", "hostPath": "/nonexistent"}]}}]}))
    with pytest.raises(errdefs.InvalidArgument, match="/nonexistent"):
        cdi.inject(_base_spec(), ["example.com/probe=null0"], [str(a), str(b)])
    (b / "win.json").write_text(json.dumps({
        "cdiVersion": "0.6.0", "kind": "example.com/probe",
        "devices": [{"name": "null0", "containerEdits": {"netDevices": [{"name": "x"}]}}]}))
    with pytest.raises(errdefs.NotImplemented_, match="netDevices"):
        cdi.inject(_base_spec(), ["example.com/probe=null0"], [str(a), str(b)])


def test_requests_from_the_field_and_annotations(tmp_path: Path) -> None:
    a, _ = _dirs(tmp_path)
    (a / "probe.yaml").write_text(YAML_SPEC)
    assert cdi.requested(["v.com/c=1"], {"cdi.k8s.io/x": "v.com/c=2, v.com/c=1",
                                         "other": "v.com/c=3"}) == ["v.com/c=1", "v.com/c=2"]
    config = cri.ContainerConfig(cdi_devices=[cri.CdiDevice("example.com/probe=null0")])
    off = parse({}, state=tmp_path)
    assert not off.enable_cdi and off.cdi_spec_dirs == ["/etc/cdi", "/var/run/cdi"]
    with pytest.raises(errdefs.FailedPrecondition, match="enable_cdi"):
        cdi.for_container(_base_spec(), config, off)
    on = parse({"enable_cdi": True, "cdi_spec_dirs": [str(a)]}, state=tmp_path)
    assert "enable_cdi" not in on.unsupported
    out = cdi.for_container(_base_spec(), config, on)
    assert "PROBE_DEVICE=null0" in out["process"]["env"]
    plain = _base_spec()
    assert cdi.for_container(plain, cri.ContainerConfig(), off) is plain
    with pytest.raises(errdefs.InvalidArgument, match="cdi_spec_dirs"):
        parse({"cdi_spec_dirs": ["relative"]}, state=tmp_path)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["cdiVersion", "kind", "devices", "name", "containerEdits", "env",
                         "deviceNodes", "mounts", "hooks", "path", "hostPath",
                         "containerPath", "hookName", "type", "major", "minor",
                         "permissions", "additionalGids", "options", "timeout"]),
        inner, max_size=6),
    max_leaves=25)


_edits = st.fixed_dictionaries({}, optional={
    "env": _json, "deviceNodes": st.lists(_json, max_size=2), "mounts": st.lists(
        _json, max_size=2), "hooks": st.lists(_json, max_size=2), "additionalGids": _json})


@settings(max_examples=300, deadline=None)
@given(doc=_json | st.builds(lambda e: {"devices": [{"name": "a", "containerEdits": e}]},
                             _edits),
       kind=st.sampled_from(["example.com/f", "x", 3]))
def test_spec_files_fuzzed(tmp_path_factory: pytest.TempPathFactory, doc: object,
                           kind: object) -> None:
    """Whatever a spec file holds: a device, a skipped file or a clear error; never a
    crash of another kind."""
    d = tmp_path_factory.mktemp("cdi")
    if isinstance(doc, dict):
        doc.setdefault("kind", kind)
        doc.setdefault("cdiVersion", "0.6.0")
    for name in ("f.json", "g.yaml"):  # JSON is YAML too
        (d / name).write_text(json.dumps(doc))
        try:
            out = cdi.inject(_base_spec(), ["example.com/f=a"], [str(d)])
            json.dumps(out)
        except errdefs.BerthError:
            pass
        (d / name).unlink()
