"""Network attachments in the metadata database.

A row is written *before* a plugin sets anything up (state ``attaching``) and removed only
after its teardown succeeded, so whatever berthd dies in the middle of, the next berthd
(or the garbage collector) finds the row and tears the attachment down.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from berth.core import errdefs
from berth.core.metadata.db import Database
from berth.core.networks.types import (
    DNS,
    Interface,
    IPConfig,
    PortMapping,
    Result,
    Route,
    SetupRequest,
)

COMPONENT = "networks"
MIGRATIONS: list[str] = [
    """
    CREATE TABLE network_attachments (
        namespace TEXT NOT NULL,
        id TEXT NOT NULL,
        network TEXT NOT NULL,
        plugin TEXT NOT NULL,
        container INTEGER NOT NULL,
        netns TEXT NOT NULL,
        owned_netns INTEGER NOT NULL,
        ifname TEXT NOT NULL,
        state TEXT NOT NULL,
        request TEXT NOT NULL,
        result TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        PRIMARY KEY (namespace, id, network)
    );
    CREATE INDEX network_attachments_netns ON network_attachments(netns)
    """,
]

ATTACHING = "attaching"
ATTACHED = "attached"


@dataclass
class Attachment:
    namespace: str
    id: str
    network: str
    plugin: str
    netns: str
    ifname: str = "eth0"
    container: bool = False      # made for a berth container (its task's netns)
    owned_netns: bool = False    # berth made the netns and removes it with the last one
    state: str = ATTACHING
    port_mappings: list[PortMapping] = field(default_factory=list)
    ips: list[str] = field(default_factory=list)
    mac: str = ""
    bandwidth: dict[str, int] = field(default_factory=dict)
    result: Result | None = None
    created_at: str = ""

    def request(self) -> SetupRequest:
        return SetupRequest(namespace=self.namespace, id=self.id, netns=self.netns,
                            ifname=self.ifname, port_mappings=list(self.port_mappings),
                            ips=list(self.ips), mac=self.mac, bandwidth=dict(self.bandwidth),
                            previous=self.result)


def result_to_json(r: Result | None) -> str:
    return "" if r is None else json.dumps(dataclasses.asdict(r), sort_keys=True)


def result_from_json(text: str) -> Result | None:
    if not text:
        return None
    d = json.loads(text)
    return Result(
        cni_version=d.get("cni_version", ""),
        interfaces=[Interface(**i) for i in d.get("interfaces", [])],
        ips=[IPConfig(**i) for i in d.get("ips", [])],
        routes=[Route(**r) for r in d.get("routes", [])],
        dns=DNS(**d.get("dns", {})),
        raw=d.get("raw", {}),
    )


def _request_json(a: Attachment) -> str:
    return json.dumps({"ports": [dataclasses.asdict(p) for p in a.port_mappings],
                       "ips": a.ips, "mac": a.mac, "bandwidth": a.bandwidth}, sort_keys=True)


def _row(r: sqlite3.Row) -> Attachment:
    req: dict[str, Any] = json.loads(r["request"])
    return Attachment(
        namespace=r["namespace"], id=r["id"], network=r["network"], plugin=r["plugin"],
        netns=r["netns"], ifname=r["ifname"], container=bool(r["container"]),
        owned_netns=bool(r["owned_netns"]), state=r["state"],
        port_mappings=[PortMapping(**p) for p in req.get("ports", [])],
        ips=list(req.get("ips", [])), mac=req.get("mac", ""),
        bandwidth=dict(req.get("bandwidth", {})), result=result_from_json(r["result"]),
        created_at=r["created_at"],
    )


class AttachmentStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, *attachments: Attachment) -> None:
        """Record attachments, all or none (one transaction)."""
        now = datetime.now(UTC).isoformat()
        with self.db.write() as c:
            for a in attachments:
                a.created_at = a.created_at or now
                try:
                    c.execute(
                        "INSERT INTO network_attachments(namespace, id, network, plugin, "
                        "container, netns, owned_netns, ifname, state, request, result, "
                        "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (a.namespace, a.id, a.network, a.plugin, int(a.container), a.netns,
                         int(a.owned_netns), a.ifname, a.state, _request_json(a),
                         result_to_json(a.result), a.created_at))
                except sqlite3.IntegrityError:
                    raise errdefs.AlreadyExists(
                        f"attachment of {a.id!r} to network {a.network!r}") from None

    def set_attached(self, a: Attachment, result: Result) -> None:
        a.state, a.result = ATTACHED, result
        with self.db.write() as c:
            c.execute("UPDATE network_attachments SET state = ?, result = ? "
                      "WHERE namespace = ? AND id = ? AND network = ?",
                      (ATTACHED, result_to_json(result), a.namespace, a.id, a.network))

    def remove(self, a: Attachment) -> None:
        with self.db.write() as c:
            c.execute("DELETE FROM network_attachments "
                      "WHERE namespace = ? AND id = ? AND network = ?",
                      (a.namespace, a.id, a.network))

    def list(self, namespace: str | None = None, id: str | None = None) -> list[Attachment]:
        q, args = "SELECT * FROM network_attachments WHERE 1=1", []
        if namespace is not None:
            q += " AND namespace = ?"
            args.append(namespace)
        if id is not None:
            q += " AND id = ?"
            args.append(id)
        rows = self.db.query(q + " ORDER BY namespace, id, created_at", args)
        return [_row(r) for r in rows]

    def using_netns(self, netns: str) -> int:
        count: int = self.db.query(
            "SELECT COUNT(*) FROM network_attachments WHERE netns = ?", (netns,))[0][0]
        return count

    def stale(self) -> builtins.list[Attachment]:
        """Container attachments whose container record is gone."""
        try:
            rows = self.db.query(
                "SELECT a.* FROM network_attachments a WHERE a.container = 1 AND NOT "
                "EXISTS (SELECT 1 FROM containers k WHERE k.namespace = a.namespace "
                "AND k.id = a.id)")
        except sqlite3.OperationalError:
            return []  # no containers table: no container was ever made
        return [_row(r) for r in rows]
