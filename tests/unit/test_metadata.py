"""The sqlite metadata store: schema, namespaces and leases, as containerd behaves."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from berth.core import errdefs
from berth.core.metadata import db as dbmod
from berth.core.metadata.db import Database
from berth.core.metadata.leases import LeaseStore, Resource, random_id
from berth.core.metadata.namespaces import NamespaceStore


@pytest.fixture
def db(tmp_path: Path) -> Database:
    d = Database(tmp_path / "meta.db")
    yield d
    d.close()


def test_schema_is_migrated_and_wal(db: Database) -> None:
    assert db.version == dbmod.SCHEMA_VERSION
    mode = sqlite3.connect(db.path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "meta.db"
    c = sqlite3.connect(p)
    c.execute(f"PRAGMA user_version={dbmod.SCHEMA_VERSION + 1}")
    c.close()
    with pytest.raises(RuntimeError, match="newer than this berth"):
        Database(p)


def test_failed_write_rolls_back(db: Database) -> None:
    ns = NamespaceStore(db)
    with pytest.raises(ZeroDivisionError), db.write() as c:
        c.execute("INSERT INTO namespaces(name, created_at) VALUES ('x', 'now')")
        1 / 0  # noqa: B018
    assert ns.list() == []


def test_single_statement_reads_see_writes_and_end_their_transaction(db: Database) -> None:
    # query/query_one run without BEGIN/COMMIT: sqlite makes the statement its own read
    # transaction, which must be over (all rows fetched) when they return.
    assert db.query_one("SELECT name FROM namespaces WHERE name = ?", ("a",)) is None
    with db.write() as c:
        c.execute("INSERT INTO namespaces(name, created_at) VALUES ('a', 'x'), ('b', 'y')")
    row = db.query_one("SELECT name, created_at FROM namespaces WHERE name = ?", ("a",))
    assert row is not None and tuple(row) == ("a", "x")
    assert not db._conn.in_transaction
    assert [r[0] for r in db.query("SELECT name FROM namespaces ORDER BY name")] == ["a", "b"]
    assert not db._conn.in_transaction
    with db.write() as c:  # a write right after finds no reader in the way
        c.execute("DELETE FROM namespaces WHERE name = 'a'")
    assert db.query_one("SELECT 1 FROM namespaces WHERE name = 'a'") is None


def test_namespace_create_list_labels(db: Database) -> None:
    ns = NamespaceStore(db)
    ns.create("b", {"k": "v"})
    ns.create("a", {})
    assert [n.name for n in ns.list()] == ["a", "b"]
    assert ns.labels("b") == {"k": "v"}
    with pytest.raises(errdefs.AlreadyExists, match='namespace "a": already exists'):
        ns.create("a", {})


def test_namespace_labels_of_missing_namespace_are_empty(db: Database) -> None:
    assert NamespaceStore(db).labels("nope") == {}


def test_namespace_set_label_and_clear(db: Database) -> None:
    ns = NamespaceStore(db)
    ns.create("a", {"x": "1", "y": "2"})
    ns.set_label("a", "x", "")
    ns.set_label("a", "z", "3")
    assert ns.labels("a") == {"y": "2", "z": "3"}
    ns.set_labels("a", {"only": "1"}, replace=True)
    assert ns.labels("a") == {"only": "1"}


@pytest.mark.parametrize("name", ["bad/name", "-x", "x-", "a" * 77, "", "a..b"])
def test_namespace_name_rule(db: Database, name: str) -> None:
    with pytest.raises(errdefs.InvalidArgument):
        NamespaceStore(db).create(name, {})


def test_label_size_limit(db: Database) -> None:
    with pytest.raises(errdefs.InvalidArgument, match="greater than maximum size"):
        NamespaceStore(db).create("a", {"k": "v" * 4096})


def test_namespace_delete_rules(db: Database) -> None:
    ns = NamespaceStore(db)
    with pytest.raises(errdefs.NotFound, match='namespace "a": not found'):
        ns.delete("a")
    ns.create("a", {})
    db.namespace_checks.append(lambda c, n: "images")
    db.namespace_checks.append(lambda c, n: None)
    db.namespace_checks.append(lambda c, n: "blobs")
    with pytest.raises(errdefs.FailedPrecondition,
                       match='namespace "a" must be empty, but it still has images, blobs'):
        ns.delete("a")
    db.namespace_checks.clear()
    ns.delete("a")
    assert ns.list() == []


def test_leases_create_implies_namespace_and_cascade(db: Database) -> None:
    leases, ns = LeaseStore(db), NamespaceStore(db)
    leases.create("n1", "l1", {"a": "b"})
    assert [n.name for n in ns.list()] == ["n1"]
    with pytest.raises(errdefs.AlreadyExists, match='lease "l1": already exists'):
        leases.create("n1", "l1", {})
    leases.create("n2", "l1", {})  # per namespace
    ns.delete("n1")  # leases do not keep a namespace alive, as in containerd
    assert leases.list("n1") == []
    assert [x.id for x in leases.list("n2")] == ["l1"]


def test_lease_list_filters(db: Database) -> None:
    leases = LeaseStore(db)
    leases.create("n", "a", {"k": "v"})
    leases.create("n", "b", {"k": "w"})
    assert [x.id for x in leases.list("n", ['labels."k"==v'])] == ["a"]
    assert [x.id for x in leases.list("n", ["id==b"])] == ["b"]
    assert [x.id for x in leases.list("n", ["id==a", "id==b"])] == ["a", "b"]
    with pytest.raises(errdefs.InvalidArgument):
        leases.list("n", ["id=="])


def test_lease_resources(db: Database) -> None:
    leases = LeaseStore(db)
    leases.create("n", "l", {})
    digest = "sha256:" + "a" * 64
    leases.add_resource("n", "l", Resource(id=digest, type="content"))
    leases.add_resource("n", "l", Resource(id="k1", type="snapshots/overlayfs"))
    leases.add_resource("n", "l", Resource(id="k1", type="snapshots/overlayfs"))
    assert leases.list_resources("n", "l") == [
        Resource(id=digest, type="content"), Resource(id="k1", type="snapshots/overlayfs")]
    leases.delete_resource("n", "l", Resource(id="k1", type="snapshots/overlayfs"))
    assert len(leases.list_resources("n", "l")) == 1
    with pytest.raises(errdefs.InvalidArgument, match="invalid content resource id"):
        leases.add_resource("n", "l", Resource(id="nope", type="content"))
    with pytest.raises(errdefs.InvalidArgument, match="invalid snapshot resource type"):
        leases.add_resource("n", "l", Resource(id="x", type="snapshots"))
    with pytest.raises(errdefs.NotImplemented_, match="resource type foo not supported yet"):
        leases.add_resource("n", "l", Resource(id="x", type="foo"))
    with pytest.raises(errdefs.NotFound, match='lease "zz": not found'):
        leases.add_resource("n", "zz", Resource(id=digest, type="content"))
    leases.delete("n", "l")
    with pytest.raises(errdefs.NotFound):
        leases.delete("n", "l")


def test_random_lease_ids_differ() -> None:
    assert random_id() != random_id()


def test_state_survives_reopen(tmp_path: Path) -> None:
    d = Database(tmp_path / "m.db")
    NamespaceStore(d).create("keep", {"a": "1"})
    LeaseStore(d).create("keep", "l", {"b": "2"})
    d.close()
    d2 = Database(tmp_path / "m.db")
    assert NamespaceStore(d2).labels("keep") == {"a": "1"}
    assert LeaseStore(d2).get("keep", "l").labels == {"b": "2"}
    d2.close()


def test_component_schemas_migrate_once_and_in_order(tmp_path: Path) -> None:
    d = Database(tmp_path / "m.db")
    v1 = ["CREATE TABLE widgets (id TEXT PRIMARY KEY)"]
    assert d.ensure_schema("widgets", v1) == 1
    assert d.ensure_schema("widgets", v1) == 1  # idempotent
    v2 = [*v1, "ALTER TABLE widgets ADD COLUMN size INTEGER NOT NULL DEFAULT 0"]
    assert d.ensure_schema("widgets", v2) == 2
    with d.write() as c:
        c.execute("INSERT INTO widgets(id, size) VALUES ('a', 3)")
    with pytest.raises(RuntimeError, match="newer than"):
        d.ensure_schema("widgets", v1)
    d.close()


def test_namespace_checks_follow_rank(db: Database) -> None:
    ns = NamespaceStore(db)
    ns.create("a", {})
    db.add_namespace_check(40, lambda c, n: 'snapshots on "overlayfs" snapshotter')
    db.add_namespace_check(10, lambda c, n: "images")
    with pytest.raises(errdefs.FailedPrecondition,
                       match='still has images, snapshots on "overlayfs" snapshotter'):
        ns.delete("a")
