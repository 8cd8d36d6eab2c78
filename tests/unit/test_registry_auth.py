"""Registry authentication (sans-io) and the registry client against an in-memory
registry (httpx's MockTransport: no sockets)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from berth.core import errdefs
from berth.core.distribution import auth
from berth.core.distribution.client import Registry
from berth.core.images import mediatypes
from berth.core.images.manifest import Descriptor

# --- challenges ----------------------------------------------------------------------------


def test_docker_hub_bearer_challenge() -> None:
    [ch] = auth.parse_challenges(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/busybox:pull"')
    assert ch.scheme == "bearer"
    assert ch.params == {"realm": "https://auth.docker.io/token",
                         "service": "registry.docker.io",
                         "scope": "repository:library/busybox:pull"}


def test_several_challenges_and_header_values() -> None:
    chs = auth.parse_challenges(['Basic realm="a b", Bearer realm=x, service="s,t"',
                                 'Negotiate abc==, Basic Realm="q\\"x"'])
    assert [(c.scheme, c.params, c.token68) for c in chs] == [
        ("basic", {"realm": "a b"}, ""),
        ("bearer", {"realm": "x", "service": "s,t"}, ""),
        ("negotiate", {}, "abc=="),
        ("basic", {"realm": 'q"x'}, ""),
    ]


def test_malformed_challenge_keeps_what_was_understood() -> None:
    chs = auth.parse_challenges('Basic realm="never closed')
    assert [c.scheme for c in chs] == ["basic"]
    assert auth.parse_challenges("") == []


# --- token requests and responses ----------------------------------------------------------


def test_token_request_merges_scopes_and_sends_credentials() -> None:
    ch = auth.Challenge("bearer", {"realm": "https://auth.example/token?x=1",
                                   "service": "reg", "scope": "repository:a:pull"})
    creds = auth.Credentials("u", "p")
    req = auth.token_request(ch, ["repository:a:push", "repository:b:pull"], creds)
    parts = urlsplit(req.url)
    q = parse_qs(parts.query)
    assert parts.netloc == "auth.example" and q["x"] == ["1"]
    assert q["service"] == ["reg"]
    assert q["scope"] == ["repository:a:pull,push", "repository:b:pull"]
    assert q["account"] == ["u"]
    assert req.headers["Authorization"] == "Basic " + base64.b64encode(b"u:p").decode()


def test_token_request_needs_a_realm() -> None:
    with pytest.raises(errdefs.InvalidArgument):
        auth.token_request(auth.Challenge("bearer", {"realm": "/relative"}), [], None)


def test_parse_token_response() -> None:
    t = auth.parse_token_response(b'{"token": "abc", "expires_in": 300}', now=100.0)
    assert t.value == "abc" and t.expires_at == 400.0
    assert auth.parse_token_response(b'{"access_token": "o"}', now=0.0).expires_at == \
        auth.DEFAULT_TOKEN_SECONDS
    assert t.valid(now=390.0) and not t.valid(now=396.0)
    for bad in (b"nope", b"[]", b'{"token": ""}'):
        with pytest.raises(errdefs.InvalidArgument):
            auth.parse_token_response(bad)


# --- the authorizer ------------------------------------------------------------------------

SCOPES = ["repository:busybox:pull"]
BEARER = auth.Challenge("bearer", {"realm": "https://a/token", "service": "r"})


def test_bearer_flow_and_refusal() -> None:
    a = auth.Authorizer()
    assert a.header(SCOPES) is None
    req = a.challenged([BEARER], SCOPES, None)
    assert isinstance(req, auth.TokenRequest)
    a.token_received(req, SCOPES, auth.Token("t1", 10**12))
    assert a.header(SCOPES) == "Bearer t1"
    assert a.needs_token(SCOPES) is None
    # A narrower request reuses the token; a new repository needs its own.
    assert a.needs_token(["repository:other:pull"]) is not None
    # Refused once: one more token; refused again: give up.
    again = a.challenged([BEARER], SCOPES, "Bearer t1")
    assert isinstance(again, auth.TokenRequest)
    a.token_received(again, SCOPES, auth.Token("t2", 10**12))
    with pytest.raises(auth.Unauthorized):
        a.challenged([BEARER], SCOPES, "Bearer t2")


def test_expired_token_is_not_sent() -> None:
    a = auth.Authorizer()
    req = a.challenged([BEARER], SCOPES, None)
    assert isinstance(req, auth.TokenRequest)
    a.token_received(req, SCOPES, auth.Token("old", 50.0))
    assert a.header(SCOPES, now=10.0) == "Bearer old"
    assert a.header(SCOPES, now=60.0) is None
    assert a.needs_token(SCOPES, now=60.0) is not None


def test_basic_flow() -> None:
    basic = auth.Challenge("basic", {"realm": "r"})
    with pytest.raises(auth.Unauthorized):
        auth.Authorizer().challenged([basic], SCOPES, None)
    a = auth.Authorizer(auth.Credentials("u", "p"))
    assert a.challenged([basic], SCOPES, None) is True
    assert a.header(SCOPES) == auth.Credentials("u", "p").basic()
    with pytest.raises(auth.Unauthorized):
        a.challenged([basic], SCOPES, a.header(SCOPES))
    with pytest.raises(auth.Unauthorized):
        a.challenged([auth.Challenge("negotiate")], SCOPES, None)


# --- the client against an in-memory registry ----------------------------------------------

def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class FakeRegistry:
    """Just enough of the distribution API, with bearer tokens."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    uploads: dict[str, bytearray] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    tokens_issued: int = 0
    honor_range: bool = True
    corrupt: bool = False

    def handle(self, req: httpx.Request) -> httpx.Response:
        self.requests.append((req.method, str(req.url), dict(req.headers)))
        url = req.url
        if url.host == "auth.test":
            self.tokens_issued += 1
            scope = " ".join(parse_qs(url.query.decode()).get("scope", []))
            return httpx.Response(200, json={"token": f"tok:{scope}", "expires_in": 300})
        if not req.headers.get("authorization", "").startswith("Bearer tok:"):
            return httpx.Response(401, headers={"WWW-Authenticate":
                'Bearer realm="https://auth.test/token",service="fake"'})
        path = url.path
        m = re.fullmatch(r"/v2/(.+)/manifests/(.+)", path)
        if m:
            return self._manifest(req, m.group(2))
        m = re.fullmatch(r"/v2/(.+)/blobs/uploads/(.*)", path)
        if m:
            return self._upload(req, m.group(1), m.group(2))
        m = re.fullmatch(r"/v2/(.+)/blobs/(sha256:[0-9a-f]+)", path)
        if m:
            return self._blob(req, m.group(2))
        return httpx.Response(404)

    def _manifest(self, req: httpx.Request, ref: str) -> httpx.Response:
        if req.method == "PUT":
            data = req.content
            self.manifests[ref] = (req.headers["content-type"], data)
            self.manifests[_sha(data)] = (req.headers["content-type"], data)
            return httpx.Response(201, headers={"Docker-Content-Digest": _sha(data)})
        if ref not in self.manifests:
            return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN",
                                                         "message": "unknown"}]})
        mt, data = self.manifests[ref]
        headers = {"Content-Type": mt, "Docker-Content-Digest": _sha(data),
                   "Content-Length": str(len(data))}
        return httpx.Response(200, headers=headers,
                              content=b"" if req.method == "HEAD" else data)

    def _blob(self, req: httpx.Request, digest: str) -> httpx.Response:
        if digest not in self.blobs:
            return httpx.Response(404)
        data = self.blobs[digest]
        if self.corrupt:
            data = b"X" + data[1:]
        if req.method == "HEAD":
            return httpx.Response(200, headers={"Content-Length": str(len(data))})
        rng = req.headers.get("range")
        if rng and self.honor_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            return httpx.Response(206, content=data[start:], headers={
                "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
        return httpx.Response(200, content=data)

    def _upload(self, req: httpx.Request, repo: str, uid: str) -> httpx.Response:
        q = parse_qs(req.url.query.decode())
        if req.method == "POST":
            if "mount" in q and q["mount"][0] in self.blobs:
                return httpx.Response(201)
            uid = str(len(self.uploads))
            self.uploads[uid] = bytearray()
            return httpx.Response(202, headers={"Location": f"/v2/{repo}/blobs/uploads/{uid}"})
        if req.method == "DELETE":
            self.uploads.pop(uid, None)
            return httpx.Response(204)
        buf = self.uploads[uid]
        if req.method == "PATCH":
            start, end = (int(x) for x in req.headers["content-range"].split("-"))
            assert start == len(buf) and end - start + 1 == len(req.content)
            buf += req.content
            return httpx.Response(202, headers={"Location": f"/v2/{repo}/blobs/uploads/{uid}"})
        buf += req.content
        digest = q["digest"][0]
        if _sha(bytes(buf)) != digest:
            return httpx.Response(400, json={"errors": [{"code": "DIGEST_INVALID"}]})
        self.blobs[digest] = bytes(buf)
        return httpx.Response(201, headers={"Docker-Content-Digest": digest})


def _client(fake: FakeRegistry, **kw: object) -> Registry:
    return Registry("reg.test", transport=httpx.MockTransport(fake.handle), **kw)  # type: ignore[arg-type]


async def _read(reg: Registry, desc: Descriptor, offset: int = 0) -> bytes:
    out = b""
    async with reg.fetch_blob("lib/img", desc, offset) as stream:
        async for chunk in stream:
            out += chunk
    return out


def _run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


BLOB = bytes(range(256)) * 400


def test_resolve_fetch_and_token_reuse() -> None:
    fake = FakeRegistry()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": mediatypes.OCI_MANIFEST}).encode()
    fake.manifests["v1"] = fake.manifests[_sha(manifest)] = (mediatypes.OCI_MANIFEST, manifest)
    fake.blobs[_sha(BLOB)] = BLOB
    desc = Descriptor(mediatypes.OCI_LAYER, _sha(BLOB), len(BLOB))

    async def go() -> None:
        async with _client(fake) as reg:
            got = await reg.resolve("lib/img", "v1")
            assert (got.media_type, got.digest, got.size) == (
                mediatypes.OCI_MANIFEST, _sha(manifest), len(manifest))
            assert await reg.fetch_manifest("lib/img", got) == manifest
            assert await _read(reg, desc) == BLOB
            assert await _read(reg, desc, 1000) == BLOB[1000:]
            with pytest.raises(errdefs.NotFound):
                await reg.resolve("lib/img", "nope")

    _run(go())
    assert fake.tokens_issued == 1
    ranged = [h.get("range") for m, u, h in fake.requests if "/blobs/" in u and m == "GET"]
    assert ranged == [None, "bytes=1000-"]
    accept = [h.get("accept") for m, u, h in fake.requests if m == "HEAD"][-1]
    assert mediatypes.OCI_INDEX in accept and mediatypes.DOCKER_MANIFEST in accept


def test_range_ignored_drops_the_prefix() -> None:
    fake = FakeRegistry(honor_range=False)
    fake.blobs[_sha(BLOB)] = BLOB
    desc = Descriptor(mediatypes.OCI_LAYER, _sha(BLOB), len(BLOB))

    async def go() -> bytes:
        async with _client(fake) as reg:
            return await _read(reg, desc, 5000)

    assert _run(go()) == BLOB[5000:]


def test_digest_and_size_are_verified() -> None:
    fake = FakeRegistry(corrupt=True)
    fake.blobs[_sha(BLOB)] = BLOB
    desc = Descriptor(mediatypes.OCI_LAYER, _sha(BLOB), len(BLOB))

    async def go(d: Descriptor) -> None:
        async with _client(fake) as reg:
            await _read(reg, d)

    with pytest.raises(errdefs.FailedPrecondition, match="digest mismatch"):
        _run(go(desc))
    fake.corrupt = False
    with pytest.raises(errdefs.FailedPrecondition, match="more than"):
        _run(go(Descriptor(desc.media_type, desc.digest, 100)))
    with pytest.raises(errdefs.FailedPrecondition, match="short read"):
        _run(go(Descriptor(desc.media_type, desc.digest, len(BLOB) + 1)))


@pytest.mark.parametrize("chunk_size", [1 << 20, 30000])
def test_upload_monolithic_and_chunked(chunk_size: int) -> None:
    fake = FakeRegistry()
    desc = Descriptor(mediatypes.OCI_LAYER, _sha(BLOB), len(BLOB))
    moved: list[int] = []

    async def read(offset: int, size: int) -> AsyncIterator[bytes]:
        end = offset + size if size else len(BLOB)
        for i in range(offset, end, 7000):
            yield BLOB[i:min(i + 7000, end)]

    async def go() -> None:
        async with _client(fake, chunk_size=chunk_size) as reg:
            assert not await reg.blob_exists("lib/img", desc.digest)
            await reg.upload_blob("lib/img", desc, read, progress=moved.append)
            assert await reg.blob_exists("lib/img", desc.digest)
            assert await reg.mount_blob("lib/other", desc.digest, "lib/img")
            assert not await reg.mount_blob("lib/other", _sha(b"x"), "lib/img")
            digest = await reg.put_manifest("lib/img", "v2", mediatypes.OCI_MANIFEST, b"{}")
            assert digest == _sha(b"{}")
            assert await reg.manifest_exists("lib/img", digest)

    _run(go())
    assert fake.blobs[desc.digest] == BLOB
    assert sum(moved) == len(BLOB)
    patches = [u for m, u, _ in fake.requests if m == "PATCH"]
    assert len(patches) == (0 if chunk_size > len(BLOB) else -(-len(BLOB) // chunk_size))
    assert not fake.uploads.get("1")  # the refused mount's upload was cancelled


def test_unauthorized_token_server() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.host == "auth.test":
            return httpx.Response(401)
        return httpx.Response(401, headers={"WWW-Authenticate":
                                            'Bearer realm="https://auth.test/t"'})

    async def go() -> None:
        async with Registry("reg.test", transport=httpx.MockTransport(handler)) as reg:
            await reg.resolve("x", "latest")

    with pytest.raises(auth.Unauthorized):
        _run(go())
