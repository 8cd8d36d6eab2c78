"""berth's own CLI (`python -m berth.core.cli`) against a real berthd, checked with the real ctr."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests import daemons
from tests.daemons import Daemon, Result


def berth(d: Daemon, *args: str, namespace: str | None = None) -> Result:
    return daemons.berth(d.address, *args, namespace=namespace)


def ok(d: Daemon, *args: str, namespace: str | None = None) -> str:
    r = berth(d, *args, namespace=namespace)
    assert r.rc == 0, (args, r)
    return r.out


def berth_env(env: dict[str, str], *args: str) -> Result:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("BERTH_ADDRESS", "BERTH_NAMESPACE", "CONTAINERD_ADDRESS",
                          "CONTAINERD_NAMESPACE")}
    p = subprocess.run([sys.executable, "-m", "berth.core.cli", *args], capture_output=True,
                       text=True, timeout=60, env={**clean, **env})
    return Result(p.returncode, p.stdout, p.stderr)


def test_version(berthd: Daemon) -> None:
    out = ok(berthd, "version")
    ctr_uuid = re.search(r"UUID: (\S+)", daemons.ctr_ok(berthd.address, "version").out)
    assert ctr_uuid
    assert out == ("Client:\n  Version:  0.1.0\n\nServer:\n  Version:  0.1.0\n"
                   f"  Revision: berth\n  UUID: {ctr_uuid.group(1)}\n")
    (data,) = json.loads(ok(berthd, "--format", "json", "version"))
    assert data == {"client": {"version": "0.1.0"},
                    "server": {"version": "0.1.0", "revision": "berth",
                               "uuid": ctr_uuid.group(1)}}


def test_namespaces(berthd: Daemon) -> None:
    assert ok(berthd, "namespaces", "create", "web", "tier=front", "team=a") == ""
    assert ok(berthd, "ns", "create", "db") == ""
    r = berth(berthd, "namespaces", "create", "web")
    assert (r.rc, r.err) == (1, 'berth: namespace "web": already exists\n')
    r = berth(berthd, "namespaces", "create", "bad/name")
    assert r.rc == 1 and r.err.startswith('berth: identifier "bad/name"')

    lines = ok(berthd, "namespaces", "ls").split("\n")
    assert [line.split() for line in lines if line] == [
        ["NAME", "LABELS"], ["db"], ["web", "team=a,tier=front"]]
    assert ok(berthd, "namespaces", "ls", "-q") == "db\nweb\n"
    assert json.loads(ok(berthd, "namespaces", "ls", "--format", "json")) == [
        {"name": "db", "labels": {}}, {"name": "web", "labels": {"team": "a", "tier": "front"}}]

    assert ok(berthd, "namespaces", "label", "web", "team=", "tier=back", "new=1") == ""
    (web,) = [n for n in json.loads(ok(berthd, "--format", "json", "ns", "ls"))
              if n["name"] == "web"]
    assert web["labels"] == {"tier": "back", "new": "1"}
    # The real ctr sees the same.
    ctr_rows = [line.split() for line in
                daemons.ctr_ok(berthd.address, "ns", "ls").out.strip().split("\n")]
    assert ctr_rows == [["NAME", "LABELS"], ["db"], ["web", "new=1,tier=back"]]

    # rm prints what it removed; a missing one is not an error, as with ctr.
    assert ok(berthd, "namespaces", "rm", "db", "missing") == "db\nmissing\n"
    assert ok(berthd, "namespaces", "ls", "-q") == "web\n"


def test_plugins(berthd: Daemon) -> None:
    lines = [line.split() for line in ok(berthd, "plugins", "ls").strip().split("\n")]
    assert lines[0] == ["TYPE", "ID", "PLATFORMS", "STATUS"]
    status = {(row[0], row[1]): row[-1] for row in lines[1:]}
    for key in [("io.containerd.grpc.v1", "version"), ("io.containerd.grpc.v1", "namespaces"),
                ("io.containerd.grpc.v1", "leases"), ("io.containerd.grpc.v1", "events"),
                ("io.containerd.grpc.v1", "introspection"),
                ("io.containerd.event.v1", "exchange")]:
        assert status[key] == "ok", key
    records = json.loads(ok(berthd, "--format", "json", "plugins", "ls"))
    assert {(r["type"], r["id"]) for r in records} == set(status)
    (exchange,) = [r for r in records if r["id"] == "exchange"]
    assert exchange["status"] == "ok" and exchange["error"] == ""
    assert exchange["requires"] == ["io.containerd.metadata.v1"]
    assert int(exchange["exports"]["log_capacity"]) > 0

    detailed = ok(berthd, "plugins", "ls", "-d", "id==exchange")
    assert detailed.startswith("Type:          io.containerd.event.v1\n"
                               "ID:            exchange\n")
    assert "               io.containerd.metadata.v1\n" in detailed
    assert "log_capacity" in detailed
    only = ok(berthd, "plugins", "ls", "type==io.containerd.grpc.v1,id==version")
    assert [line.split() for line in only.strip().split("\n")] == [
        ["TYPE", "ID", "PLATFORMS", "STATUS"], ["io.containerd.grpc.v1", "version", "-", "ok"]]
    r = berth(berthd, "plugins", "ls", "id==")
    assert r.rc == 1 and r.err.startswith("berth: filters: parse error")


def test_leases(berthd: Daemon) -> None:
    assert ok(berthd, "leases", "create", "--id", "keep", "a=b", namespace="work") == "keep\n"
    assert ok(berthd, "leases", "create", "--id", "forever", "--expires", "0s",
              namespace="work") == "forever\n"
    random_id = ok(berthd, "leases", "create", namespace="work").strip()
    assert re.fullmatch(r"\d{1,9}-[A-Za-z0-9_-]{4}", random_id), random_id
    r = berth(berthd, "leases", "create", "--id", "keep", namespace="work")
    assert (r.rc, r.err) == (1, 'berth: lease "keep": already exists\n')

    assert ok(berthd, "leases", "ls", "-q", namespace="work").split() == sorted(
        ["keep", "forever", random_id])
    assert ok(berthd, "leases", "ls", "-q", "labels.a==b", namespace="work") == "keep\n"
    records = {r["id"]: r for r in json.loads(
        ok(berthd, "--format", "json", "leases", "ls", namespace="work"))}
    assert records["keep"]["labels"]["a"] == "b"
    assert "containerd.io/gc.expire" in records["keep"]["labels"]
    assert records["forever"]["labels"] == {}
    # ctr reads what berth wrote.
    assert daemons.ctr_ok(berthd.address, "leases", "ls", "-q", "id==keep",
                          namespace="work").out == "keep\n"

    r = berth(berthd, "leases", "rm", "keep", "missing", namespace="work")
    assert (r.rc, r.out) == (1, "keep\n")
    assert r.err == 'berth: unable to delete missing: lease "missing": not found\n'
    assert ok(berthd, "leases", "ls", "-q", namespace="work").split() == sorted(
        ["forever", random_id])
    assert ok(berthd, "leases", "ls", "-q", namespace="elsewhere") == ""


def test_events_since(berthd: Daemon) -> None:
    ok(berthd, "namespaces", "create", "e1", "k=v")
    ok(berthd, "namespaces", "label", "e1", "k=w")
    ok(berthd, "namespaces", "rm", "e1")
    lines = ok(berthd, "events", "--since", "0", "--no-follow").strip().split("\n")
    assert len(lines) == 3
    parsed = [re.fullmatch(r"(\d+) (\S+ \S+) (\S+) (\S+) (.*)", line) for line in lines]
    assert all(parsed), lines
    assert [(m.group(1), m.group(3), m.group(4)) for m in parsed] == [
        ("1", "default", "/namespaces/create"), ("2", "default", "/namespaces/update"),
        ("3", "e1", "/namespaces/delete")]
    assert json.loads(parsed[0].group(5)) == {"name": "e1", "labels": {"k": "v"}}

    records = [json.loads(line) for line in ok(
        berthd, "--format", "json", "events", "--since", "1", "--no-follow").strip().split("\n")]
    assert [(r["seq"], r["topic"], r["type"]) for r in records] == [
        (2, "/namespaces/update", "containerd.events.NamespaceUpdate"),
        (3, "/namespaces/delete", "containerd.events.NamespaceDelete")]
    assert records[1]["event"] == {"name": "e1"}
    filtered = ok(berthd, "events", "--since", "0", "--no-follow", 'topic=="/namespaces/delete"')
    assert filtered.startswith("3 ") and filtered.count("\n") == 1
    assert ok(berthd, "events", "--since", "3", "--no-follow") == ""


def test_namespace_and_address_from_env_and_flags(berthd: Daemon) -> None:
    env = {"BERTH_ADDRESS": str(berthd.address), "BERTH_NAMESPACE": "from-env"}
    r = berth_env(env, "leases", "create", "--id", "e")
    assert (r.rc, r.out) == (0, "e\n"), r
    r = berth_env(env, "-n", "from-flag", "leases", "create", "--id", "f")
    assert (r.rc, r.out) == (0, "f\n"), r
    r = berth_env({**env, "BERTH_ADDRESS": f"unix://{berthd.address}"}, "leases", "ls", "-q")
    assert (r.rc, r.out) == (0, "e\n"), r
    assert daemons.ctr_ok(berthd.address, "leases", "ls", "-q", namespace="from-env").out == "e\n"
    assert daemons.ctr_ok(berthd.address, "leases", "ls", "-q",
                          namespace="from-flag").out == "f\n"
    # The flag beats the environment for the address too.
    r = berth_env({"BERTH_ADDRESS": "/nonexistent/berth.sock"}, "--address",
                  str(berthd.address), "version")
    assert r.rc == 0 and "Revision: berth" in r.out
    r = berth_env({"BERTH_ADDRESS": "/nonexistent/berth.sock"}, "version")
    assert r.rc == 1 and r.err.startswith('berth: failed to dial "/nonexistent/berth.sock"')
    assert not Path("/nonexistent").exists()
