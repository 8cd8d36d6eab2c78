"""The same real `ctr` commands against containerd and berthd: same stdout, stderr, status.

Only what is random by nature is normalised: timestamps, random lease ids and the
server UUID. Everything else, error wording included, must match byte for byte.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import daemons
from tests.daemons import Daemon, Result

pytestmark = pytest.mark.interop

IDENTIFIER_RULE = r"^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$"
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z")
# containerd's WithRandomID: nanoseconds within the second, 3 random bytes in base64.
# URL-safe base64 may end in "-" or "_", where \b would not match: use look-arounds.
_RANDOM_LEASE = re.compile(r"(?<![\w-])\d{1,9}-[A-Za-z0-9_-]{4}(?![\w-])")


def normalise(text: str, *, random_ids: bool = False) -> str:
    text = _TIMESTAMP.sub("<TS>", text)
    if random_ids:
        # The ids differ in length, and ctr pads table columns to the longest cell.
        text = _RANDOM_LEASE.sub("<ID>", text)
        text = "\n".join(re.sub(r" +", " ", line) for line in text.split("\n"))
    return text


def both(b: Daemon, c: Daemon, *args: str, namespace: str | None = None
         ) -> tuple[Result, Result]:
    return (daemons.ctr(b.address, *args, namespace=namespace),
            daemons.ctr(c.address, *args, namespace=namespace))


def same(b: Daemon, c: Daemon, *args: str, namespace: str | None = None,
         random_ids: bool = False) -> Result:
    """Run ``ctr args`` on both daemons, insist on identical results, return berth's."""
    rb, rc = both(b, c, *args, namespace=namespace)
    got = (rb.rc, normalise(rb.out, random_ids=random_ids),
           normalise(rb.err, random_ids=random_ids))
    want = (rc.rc, normalise(rc.out, random_ids=random_ids),
            normalise(rc.err, random_ids=random_ids))
    assert got == want, f"ctr {' '.join(args)}: berth {got!r} != containerd {want!r}"
    return rb


# -- namespaces ------------------------------------------------------------------------


def test_namespace_lifecycle_with_labels(berthd: Daemon, containerd: Daemon) -> None:
    r = same(berthd, containerd, "namespaces", "create", "alpha", "a=1", "b=two", "z.k/x=3")
    assert r.rc == 0 and r.out == "" and r.err == ""
    same(berthd, containerd, "namespaces", "create", "beta")
    r = same(berthd, containerd, "namespaces", "ls")
    assert r.out.split("\n")[1].split() == ["alpha", "a=1,b=two,z.k/x=3"]
    r = same(berthd, containerd, "namespaces", "ls", "-q")
    assert r.out == "alpha\nbeta\n"

    # Set, change and clear (empty value) labels in one call, then list again.
    same(berthd, containerd, "namespaces", "label", "alpha", "a=", "b=2", "c=new")
    r = same(berthd, containerd, "namespaces", "ls")
    assert "b=2,c=new,z.k/x=3" in r.out and "a=1" not in r.out
    # label on a namespace that does not exist creates it, as bolt does.
    same(berthd, containerd, "namespaces", "label", "gamma", "k=v")
    r = same(berthd, containerd, "namespaces", "ls", "-q")
    assert r.out == "alpha\nbeta\ngamma\n"

    r = same(berthd, containerd, "namespaces", "create", "alpha")
    assert r.rc == 1 and r.err == 'ctr: namespace "alpha": already exists\n'

    r = same(berthd, containerd, "namespaces", "rm", "alpha", "gamma")
    assert r.out == "alpha\ngamma\n"
    r = same(berthd, containerd, "namespaces", "ls", "-q")
    assert r.out == "beta\n"


def test_namespace_invalid_names(berthd: Daemon, containerd: Daemon) -> None:
    bad = ["bad/name", "a" * 77, "-lead", " ", "trail-", "a..b", "tab\tname", "ünï"]
    for name in bad:
        r = same(berthd, containerd, "namespaces", "create", "--", name)
        assert r.rc == 1, name
        assert r.err.endswith(": invalid argument\n"), r.err
        assert 'ctr: identifier "' in r.err  # Go's %q quoting, escapes and all
    r = same(berthd, containerd, "namespaces", "create", "a" * 77)
    assert "greater than maximum length (76 characters)" in r.err
    r = same(berthd, containerd, "namespaces", "create", "bad/name")
    assert IDENTIFIER_RULE in r.err
    # ctr itself refuses an empty name before any call.
    r = same(berthd, containerd, "namespaces", "create", "")
    assert r.rc == 1 and "please specify a namespace" in r.err
    # The longest legal name and every separator are fine.
    for good in ["a" * 76, "a.b-c_d", "0"]:
        assert same(berthd, containerd, "namespaces", "create", good).rc == 0
    r = same(berthd, containerd, "namespaces", "ls", "-q")
    assert r.out == "\n".join(sorted(["a" * 76, "a.b-c_d", "0"])) + "\n"


def test_namespace_rm_missing_and_bad_request_namespace(berthd: Daemon, containerd: Daemon
                                                         ) -> None:
    # ctr ignores NotFound on rm and prints the name anyway.
    r = same(berthd, containerd, "namespaces", "rm", "missing")
    assert (r.rc, r.out) == (0, "missing\n")
    # The namespace of the *request* is where create's event is published: an invalid
    # one fails the call (Unknown) after the namespace was created, as in containerd.
    r = same(berthd, containerd, "namespaces", "create", "made", namespace="bad/ns")
    assert r.rc == 1
    assert r.err.startswith("ctr: failed publishing event: namespace validation:")
    r = same(berthd, containerd, "namespaces", "ls", "-q")
    assert r.out == "made\n"


# -- leases ----------------------------------------------------------------------------


def test_leases_create_list_filter_delete(berthd: Daemon, containerd: Daemon) -> None:
    ns = "leasing"
    r = same(berthd, containerd, "leases", "create", "--id", "x", "a=b", "c=d", namespace=ns)
    assert r.out == "x\n"
    r = same(berthd, containerd, "leases", "create", "--id", "x", namespace=ns)
    assert (r.rc, r.err) == (1, 'ctr: lease "x": already exists\n')
    same(berthd, containerd, "leases", "create", "--id", "y", "k=v", namespace=ns)
    same(berthd, containerd, "leases", "create", "--id", "z", "--expires", "0s", "k=w",
         namespace=ns)
    rb, rc = both(berthd, containerd, "leases", "create", namespace=ns)
    # Each daemon makes up its own id, in the same shape.
    assert rb.rc == rc.rc == 0 and rb.out != rc.out
    assert normalise(rb.out, random_ids=True) == normalise(rc.out, random_ids=True) == "<ID>\n"

    r = same(berthd, containerd, "leases", "ls", namespace=ns, random_ids=True)
    rows = r.out.strip().split("\n")
    assert rows[0].split() == ["ID", "CREATED", "AT", "LABELS"] and len(rows) == 5
    r = same(berthd, containerd, "leases", "ls", "-q", namespace=ns, random_ids=True)
    assert r.out.split("\n")[1:] == ["x", "y", "z", ""]

    r = same(berthd, containerd, "leases", "ls", "-q", "id==x", namespace=ns)
    assert r.out == "x\n"
    r = same(berthd, containerd, "leases", "ls", "-q", 'labels."k"==v', namespace=ns)
    assert r.out == "y\n"
    r = same(berthd, containerd, "leases", "ls", "-q", "labels.k~=^w$", namespace=ns)
    assert r.out == "z\n"
    # Several filters are ORed; commas inside one filter are ANDed.
    r = same(berthd, containerd, "leases", "ls", "-q", "id==x", "id==z", namespace=ns)
    assert r.out == "x\nz\n"
    r = same(berthd, containerd, "leases", "ls", "-q", "labels.a==b,id==y", namespace=ns)
    assert r.out == ""
    r = same(berthd, containerd, "leases", "ls", "id==z", namespace=ns)
    assert "gc.expire" not in r.out and "k=w" in r.out
    r = same(berthd, containerd, "leases", "ls", "labels.c", namespace=ns)
    assert "a=b,c=d" in r.out

    for bad in ["id==", "id===x", '"', "labels.", "id!x", "id==x,"]:
        r = same(berthd, containerd, "leases", "ls", bad, namespace=ns)
        assert r.rc == 1 and r.err.startswith("ctr: failed to list leases: filters: parse"), r

    r = same(berthd, containerd, "leases", "rm", "missing", namespace=ns)
    assert (r.rc, r.err) == (1, 'ctr: lease "missing": not found\n')
    r = same(berthd, containerd, "leases", "rm", "x", namespace=ns)
    assert (r.rc, r.out) == (0, "x\n")
    for d, created in ((berthd, rb), (containerd, rc)):
        r = daemons.ctr(d.address, "leases", "rm", created.out.strip(), namespace=ns)
        assert (r.rc, r.out) == (0, created.out)
    r = same(berthd, containerd, "leases", "ls", "-q", namespace=ns)
    assert r.out == "y\nz\n"
    # Other namespaces do not see them.
    r = same(berthd, containerd, "leases", "ls", "-q", namespace="elsewhere")
    assert r.out == ""


def test_leases_and_namespace_removal(berthd: Daemon, containerd: Daemon) -> None:
    # A lease creates its namespace implicitly.
    same(berthd, containerd, "leases", "create", "--id", "l1", "k=v", namespace="gone")
    r = same(berthd, containerd, "namespaces", "ls", "-q")
    assert r.out == "gone\n"
    # Leases do not keep a namespace alive; removing it removes them.
    r = same(berthd, containerd, "namespaces", "rm", "gone")
    assert (r.rc, r.out) == (0, "gone\n")
    r = same(berthd, containerd, "leases", "ls", namespace="gone")
    assert r.rc == 0 and r.out.split() == ["ID", "CREATED", "AT", "LABELS"]
    r = same(berthd, containerd, "leases", "rm", "l1", namespace="gone")
    assert r.err == 'ctr: lease "l1": not found\n'
    # Listing does not bring the namespace back.
    r = same(berthd, containerd, "namespaces", "ls", "-q")
    assert r.out == ""
    # An invalid request namespace is refused before anything is stored.
    r = same(berthd, containerd, "leases", "create", "--id", "q", namespace="bad/ns")
    assert r.rc == 1 and "namespace validation" in r.err
    r = same(berthd, containerd, "leases", "ls", namespace="bad/ns")
    assert r.rc == 1 and IDENTIFIER_RULE in r.err


# -- services berth does not serve ------------------------------------------------------

SERVICE_COMMANDS = {
    "images": ("images", "ls"),
    "containers": ("containers", "ls"),
    "tasks": ("tasks", "ls"),
    "content": ("content", "ls"),
    "snapshots": ("snapshots", "ls"),
}


@pytest.fixture
def bare_berthd() -> Iterator[Daemon]:
    """A berthd with the services above switched off in its config."""
    base = Path(tempfile.mkdtemp(prefix="berth-bare-", dir="/tmp"))
    cfg = base / "config.toml"
    names = ", ".join(f'"io.containerd.grpc.v1.{s}"' for s in SERVICE_COMMANDS)
    cfg.write_text(f"disabled_plugins = [{names}]\n")
    d = daemons.berthd(base, "--config", str(cfg)).start()
    yield d
    d.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("service", sorted(SERVICE_COMMANDS))
def test_unserved_services_fail_cleanly(bare_berthd: Daemon, containerd: Daemon,
                                        service: str) -> None:
    args = SERVICE_COMMANDS[service]
    rb, rc = both(bare_berthd, containerd, *args)
    assert rc.rc == 0, rc  # containerd serves all of them
    # Not "missing content-type field": grpc-go 1.33 needs a full error response.
    # (ctr content ls prints its header before it calls.)
    assert rb.rc == 1 and rb.out.count("\n") <= 1
    assert re.search(r"Unimplemented|not implemented|unknown service", rb.err), rb.err
    assert "content-type" not in rb.err
    assert f"unknown service containerd.services.{service}.v1." in rb.err
    assert_serving_version(bare_berthd)


def test_served_services_list_like_containerd(berthd: Daemon, containerd: Daemon) -> None:
    # The same commands against a full berthd: empty listings, identical to containerd's.
    for args in SERVICE_COMMANDS.values():
        r = same(berthd, containerd, *args)
        assert r.rc == 0 and r.err == ""


def assert_serving_version(d: Daemon) -> None:
    r = daemons.ctr(d.address, "version")
    assert r.rc == 0 and "Revision: berth" in r.out, r


# -- version and plugins ------------------------------------------------------------------


def test_version(berthd: Daemon, containerd: Daemon) -> None:
    rb, rc = both(berthd, containerd, "version")
    assert rb.rc == rc.rc == 0
    client_b, _, server_b = rb.out.partition("Server:")
    client_c, _, server_c = rc.out.partition("Server:")
    assert client_b == client_c  # the same ctr
    lines = [line.strip() for line in server_b.strip().split("\n")]
    assert lines[0].split() == ["Version:", "0.1.0"]
    assert lines[1].split() == ["Revision:", "berth"]
    assert re.fullmatch(r"UUID: [0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-"
                        r"[0-9a-f]{12}", lines[2]), lines[2]
    # The same UUID on every call.
    assert daemons.ctr(berthd.address, "version").out == rb.out
    assert re.search(r"UUID: [0-9a-f-]{36}", server_c)


def test_plugins(berthd: Daemon, containerd: Daemon) -> None:
    rb, rc = both(berthd, containerd, "plugins", "ls")
    assert rb.rc == rc.rc == 0
    assert rb.out.split("\n")[0].split() == rc.out.split("\n")[0].split() == \
        ["TYPE", "ID", "PLATFORMS", "STATUS"]
    status = {tuple(line.split()[:2]): line.split()[-1]
              for line in rb.out.strip().split("\n")[1:]}
    for want in [("io.containerd.grpc.v1", s) for s in
                 ("version", "namespaces", "leases", "events", "introspection")] + [
            ("io.containerd.event.v1", "exchange")]:
        assert status.get(want) == "ok", (want, rb.out)
    # Filters behave the same, wrong ones included.
    r = same(berthd, containerd, "plugins", "ls", "type==io.containerd.grpc.v1,id==version")
    assert len(r.out.strip().split("\n")) == 2
    same(berthd, containerd, "plugins", "ls", "id==nothing-like-this")
    r = same(berthd, containerd, "plugins", "ls", "id==")
    assert r.rc == 1 and r.err.endswith(": invalid argument: invalid argument\n")
    # The detailed view lists every plugin with its type and id.
    r = daemons.ctr(berthd.address, "plugins", "ls", "-d")
    assert r.rc == 0 and "Type:          io.containerd.grpc.v1" in r.out
    assert "ID:            namespaces" in r.out
