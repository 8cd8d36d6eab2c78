"""An OCI distribution (Docker registry v2) client on httpx (asyncio).

One :class:`Registry` talks to one host, over TLS or, with ``plain_http``, plain HTTP.
Authentication is :class:`berth.core.distribution.auth.Authorizer`'s business; this module only
carries out what it asks for. Blob downloads verify size and digest as the bytes go
by, and continue from an offset with a ``Range`` request; uploads are monolithic
(one PUT) or chunked (PATCHes, then the PUT), after asking whether the registry has
the blob already or can mount it from another repository of the same host.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urljoin

import httpx

from berth.core import errdefs
from berth.core.distribution import auth
from berth.core.images import mediatypes
from berth.core.images.manifest import Descriptor, detect_media_type, digest_of

DOCKER_HUB_HOST = "registry-1.docker.io"
# Blobs up to this size go up in one PUT; larger ones in PATCH chunks of this size.
DEFAULT_CHUNK = 16 << 20
USER_AGENT = "berth/0.1"


class RegistryError(errdefs.BerthError):
    """An error response, with the registry's error codes (``MANIFEST_UNKNOWN``...)."""

    def __init__(self, what: str, status: int, codes: Sequence[str] = ()) -> None:
        super().__init__(what, raw=True)
        self.status = status
        self.codes = list(codes)
        self.code = {
            401: errdefs.Code.UNAUTHENTICATED, 403: errdefs.Code.PERMISSION_DENIED,
            404: errdefs.Code.NOT_FOUND, 409: errdefs.Code.FAILED_PRECONDITION,
            416: errdefs.Code.OUT_OF_RANGE, 429: errdefs.Code.UNAVAILABLE,
        }.get(status, errdefs.Code.UNAVAILABLE if status >= 500 else
              errdefs.Code.INVALID_ARGUMENT)


def _error(resp: httpx.Response, what: str) -> RegistryError:
    codes: list[str] = []
    detail = ""
    with contextlib.suppress(Exception):
        doc = json.loads(resp.content)
        for e in doc.get("errors") or []:
            codes.append(str(e.get("code", "")))
            detail = detail or str(e.get("message", ""))
    text = f"{what}: {resp.status_code} {resp.reason_phrase}"
    if codes:
        text += f" ({', '.join(codes)}{': ' + detail if detail else ''})"
    return RegistryError(text, resp.status_code, codes)


def api_host(host: str) -> str:
    """The host that serves a registry name (Docker Hub's is not docker.io itself)."""
    return DOCKER_HUB_HOST if host in ("docker.io", "index.docker.io") else host


@dataclass
class TLSOptions:
    ca_file: str | None = None
    skip_verify: bool = False
    cert_file: str | None = None
    key_file: str | None = None

    def context(self) -> ssl.SSLContext | bool:
        if self.skip_verify:
            return False
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


class BlobStream:
    """The bytes of one blob from ``start`` on; iterate to read them.

    From offset 0 the digest is checked when the stream ends; from a later offset only
    the length can be (the content store checks the digest when the blob is committed).
    """

    def __init__(self, resp: httpx.Response, desc: Descriptor, start: int, skip: int) -> None:
        self.response = resp
        self.desc = desc
        self.start = start
        self._skip = skip  # bytes to drop: the server ignored our Range
        self.received = 0  # bytes from the server, dropped ones included
        self._hasher = hashlib.new(desc.digest.split(":", 1)[0]) if start == 0 else None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        expect = self.desc.size - self.start
        got = 0
        # Chunks as they arrive (no re-chunking): what has arrived can be stored at once,
        # so an interrupted download loses nothing it received.
        async for chunk in self.response.aiter_bytes():
            self.received += len(chunk)
            if self._skip:
                drop = min(self._skip, len(chunk))
                self._skip -= drop
                chunk = chunk[drop:]
                if not chunk:
                    continue
            got += len(chunk)
            if self.desc.size >= 0 and got > expect:
                raise errdefs.FailedPrecondition(
                    f"blob {self.desc.digest}: more than {self.desc.size} bytes")
            if self._hasher is not None:
                self._hasher.update(chunk)
            yield chunk
        if got != expect:
            raise errdefs.FailedPrecondition(
                f"blob {self.desc.digest}: short read, {self.start + got} of "
                f"{self.desc.size} bytes")
        if self._hasher is not None:
            actual = f"{self.desc.digest.split(':', 1)[0]}:{self._hasher.hexdigest()}"
            if actual != self.desc.digest:
                raise errdefs.FailedPrecondition(
                    f"blob {self.desc.digest}: digest mismatch, got {actual}")


class Registry:
    """A client for one registry host; use ``async with``."""

    def __init__(self, host: str, *, plain_http: bool = False,
                 credentials: auth.Credentials | None = None,
                 tls: TLSOptions | None = None, chunk_size: int = DEFAULT_CHUNK,
                 transport: httpx.AsyncBaseTransport | None = None,
                 timeout: float = 60.0, base: str | None = None) -> None:
        self.host = host
        self.scheme = "http" if plain_http else "https"
        # ``base``: a mirror's URL up to /v2/ (hosts.toml), in place of the host's own.
        self.base = base or f"{self.scheme}://{api_host(host)}/v2/"
        self.authorizer = auth.Authorizer(credentials)
        self.chunk_size = chunk_size
        verify = (tls or TLSOptions()).context() if not plain_http else False
        self.http = httpx.AsyncClient(
            transport=transport, verify=verify, follow_redirects=True,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)),
            headers={"User-Agent": USER_AGENT},
        )

    async def __aenter__(self) -> Registry:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    # --- requests -----------------------------------------------------------------

    def url(self, repository: str, *parts: str, query: dict[str, str] | None = None) -> str:
        url = self.base + repository + "/" + "/".join(parts)
        return url + ("?" + urlencode(query) if query else "")

    async def _authorize(self, scopes: Sequence[str]) -> str | None:
        req = self.authorizer.needs_token(scopes)
        if req is not None:
            await self._fetch_token(req, scopes)
        return self.authorizer.header(scopes)

    async def _fetch_token(self, req: auth.TokenRequest, scopes: Sequence[str]) -> None:
        resp = await self.http.get(req.url, headers=req.headers)
        if resp.status_code in (401, 403):
            raise auth.Unauthorized(f"token request to {req.url.split('?')[0]} refused: "
                                    f"{resp.status_code}")
        if resp.status_code != 200:
            raise _error(resp, f"GET token {req.url.split('?')[0]}")
        self.authorizer.token_received(req, scopes, auth.parse_token_response(resp.content))

    async def request(self, method: str, url: str, *, scopes: Sequence[str],
                      headers: dict[str, str] | None = None,
                      content: bytes | Callable[[], AsyncIterable[bytes]] | None = None,
                      stream: bool = False) -> httpx.Response:
        """Send, answering authentication challenges (a body factory is called per try).

        With ``stream`` the response body is left unread: close the response.
        """
        for _ in range(3):
            hdrs = dict(headers or {})
            sent = await self._authorize(scopes)
            if sent is not None:
                hdrs["Authorization"] = sent
            body = content() if callable(content) else content
            req = self.http.build_request(method, url, headers=hdrs, content=body)
            resp = await self.http.send(req, stream=stream)
            if resp.status_code != 401:
                return resp
            challenges = auth.parse_challenges(resp.headers.get_list("www-authenticate"))
            await resp.aclose()
            decision = self.authorizer.challenged(challenges, scopes, sent)
            if isinstance(decision, auth.TokenRequest):
                await self._fetch_token(decision, scopes)
        raise auth.Unauthorized(f"{method} {url}: still unauthorized after authenticating")

    # --- manifests ----------------------------------------------------------------

    async def resolve(self, repository: str, reference: str) -> Descriptor:
        """The descriptor a tag (or digest) names, as containerd's resolver finds it."""
        scopes = [auth.repository_scope(repository, "pull")]
        url = self.url(repository, "manifests", reference)
        accept = {"Accept": ", ".join(mediatypes.MANIFEST_ACCEPT)}
        resp = await self.request("HEAD", url, scopes=scopes, headers=accept)
        if resp.status_code == 404:
            raise errdefs.NotFound(f"{self.host}/{repository}:{reference}")
        if resp.status_code == 200:
            digest = resp.headers.get("docker-content-digest", "")
            size = resp.headers.get("content-length")
            mt = resp.headers.get("content-type", "").split(";")[0].strip()
            known = mediatypes.is_index(mt) or mediatypes.is_manifest(mt)
            if digest and size is not None and known:
                if reference.startswith("sha256:") and digest != reference:
                    raise errdefs.FailedPrecondition(
                        f"registry answered {digest} for {reference}")
                return Descriptor(mt, digest, int(size))
        # HEAD not answered usefully: fetch the manifest itself.
        resp = await self.request("GET", url, scopes=scopes, headers=accept)
        if resp.status_code == 404:
            raise errdefs.NotFound(f"{self.host}/{repository}:{reference}")
        if resp.status_code != 200:
            raise _error(resp, f"GET {url}")
        data = resp.content
        mt = resp.headers.get("content-type", "").split(";")[0].strip()
        if not (mediatypes.is_index(mt) or mediatypes.is_manifest(mt)):
            mt = detect_media_type(data)
        digest = digest_of(data)
        if reference.startswith("sha256:") and digest != reference:
            raise errdefs.FailedPrecondition(f"registry answered {digest} for {reference}")
        return Descriptor(mt, digest, len(data))

    async def fetch_manifest(self, repository: str, desc: Descriptor) -> bytes:
        scopes = [auth.repository_scope(repository, "pull")]
        url = self.url(repository, "manifests", desc.digest)
        accept = {"Accept": ", ".join(dict.fromkeys([desc.media_type,
                                                     *mediatypes.MANIFEST_ACCEPT]))}
        resp = await self.request("GET", url, scopes=scopes, headers=accept)
        if resp.status_code == 404:
            raise errdefs.NotFound(f"manifest {desc.digest}")
        if resp.status_code != 200:
            raise _error(resp, f"GET {url}")
        data = resp.content
        if len(data) != desc.size or digest_of(data) != desc.digest:
            raise errdefs.FailedPrecondition(f"manifest {desc.digest}: digest mismatch")
        return data

    async def manifest_exists(self, repository: str, reference: str,
                              scopes: Sequence[str] | None = None) -> bool:
        url = self.url(repository, "manifests", reference)
        accept = {"Accept": ", ".join(mediatypes.MANIFEST_ACCEPT)}
        resp = await self.request("HEAD", url, headers=accept, scopes=scopes or [
            auth.repository_scope(repository, "pull")])
        if resp.status_code == 404:
            return False
        if resp.status_code != 200:
            raise _error(resp, f"HEAD {url}")
        return True

    async def put_manifest(self, repository: str, reference: str, media_type: str,
                           data: bytes) -> str:
        scopes = [auth.repository_scope(repository, "pull", "push")]
        url = self.url(repository, "manifests", reference)
        resp = await self.request("PUT", url, scopes=scopes, content=data,
                                  headers={"Content-Type": media_type})
        if resp.status_code not in (200, 201, 202):
            raise _error(resp, f"PUT {url}")
        digest = digest_of(data)
        answered = resp.headers.get("docker-content-digest")
        if answered and answered != digest:
            raise errdefs.FailedPrecondition(f"registry stored {answered}, we sent {digest}")
        return digest

    # --- blobs --------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def fetch_blob(self, repository: str, desc: Descriptor, offset: int = 0
                         ) -> AsyncIterator[BlobStream]:
        """``async with reg.fetch_blob(repo, desc, offset) as stream``: ``async for``
        the bytes from ``offset`` on (``stream.start``)."""
        scopes = [auth.repository_scope(repository, "pull")]
        url = self.url(repository, "blobs", desc.digest)
        headers = {"Range": f"bytes={offset}-"} if offset > 0 else {}
        resp = await self.request("GET", url, scopes=scopes, headers=headers, stream=True)
        try:
            skip = 0
            if resp.status_code == 206 and offset > 0:
                start = _range_start(resp.headers.get("content-range", ""))
                if start != offset:
                    raise errdefs.FailedPrecondition(
                        f"blob {desc.digest}: asked for bytes from {offset}, got {start}")
            elif resp.status_code == 200:
                skip = offset  # Range ignored: the whole blob comes, drop what we have
            elif resp.status_code == 404:
                raise errdefs.NotFound(f"blob {desc.digest} in {self.host}/{repository}")
            else:
                await resp.aread()
                raise _error(resp, f"GET {url}")
            yield BlobStream(resp, desc, offset, skip)
        finally:
            await resp.aclose()

    async def blob_exists(self, repository: str, digest: str) -> bool:
        scopes = [auth.repository_scope(repository, "pull", "push")]
        url = self.url(repository, "blobs", digest)
        resp = await self.request("HEAD", url, scopes=scopes)
        if resp.status_code == 404:
            return False
        if resp.status_code != 200:
            raise _error(resp, f"HEAD {url}")
        return True

    async def _start_upload(self, repository: str, query: dict[str, str] | None,
                            scopes: Sequence[str]) -> tuple[int, str]:
        url = self.url(repository, "blobs", "uploads", "", query=query)
        resp = await self.request("POST", url, scopes=scopes, content=b"")
        if resp.status_code not in (201, 202):
            raise _error(resp, f"POST {url}")
        return resp.status_code, urljoin(url, resp.headers.get("location", ""))

    async def mount_blob(self, repository: str, digest: str, from_repository: str) -> bool:
        """Ask for a cross-repository mount; True when the registry did it."""
        scopes = [auth.repository_scope(repository, "pull", "push"),
                  auth.repository_scope(from_repository, "pull")]
        status, location = await self._start_upload(
            repository, {"mount": digest, "from": from_repository}, scopes)
        if status == 201:
            return True
        # The registry started an ordinary upload instead: cancel it.
        with contextlib.suppress(httpx.HTTPError):
            resp = await self.request("DELETE", location, scopes=scopes)
            await resp.aclose()
        return False

    async def upload_blob(self, repository: str, desc: Descriptor,
                          read: Callable[[int, int], AsyncIterable[bytes]],
                          progress: Callable[[int], None] | None = None) -> None:
        """Upload ``desc``; ``read(offset, size)`` yields ``size`` of its bytes from
        ``offset`` on (size 0: to the end)."""
        scopes = [auth.repository_scope(repository, "pull", "push")]
        _, location = await self._start_upload(repository, None, scopes)
        if desc.size <= self.chunk_size:
            await self._put_blob(location, desc, scopes, lambda: _counted(read(0, 0), progress))
            return
        offset = 0
        while offset < desc.size:
            end = min(offset + self.chunk_size, desc.size)
            chunk = await _collect(read(offset, end - offset), end - offset)
            resp = await self.request("PATCH", location, scopes=scopes, content=chunk, headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{end - 1}",
                "Content-Length": str(len(chunk)),
            })
            if resp.status_code != 202:
                raise _error(resp, f"PATCH {location}")
            location = urljoin(location, resp.headers.get("location", location))
            offset = end
            if progress is not None:
                progress(len(chunk))
        await self._put_blob(location, desc, scopes, None)

    async def _put_blob(self, location: str, desc: Descriptor, scopes: Sequence[str],
                        body: Callable[[], AsyncIterable[bytes]] | None) -> None:
        sep = "&" if "?" in location else "?"
        url = f"{location}{sep}{urlencode({'digest': desc.digest})}"
        headers: dict[str, Any] = {"Content-Type": "application/octet-stream"}
        if body is not None:
            headers["Content-Length"] = str(desc.size)
        resp = await self.request("PUT", url, scopes=scopes, headers=headers,
                                  content=body if body is not None else b"")
        if resp.status_code not in (201, 204):
            raise _error(resp, f"PUT {location}")
        answered = resp.headers.get("docker-content-digest")
        if answered and answered != desc.digest:
            raise errdefs.FailedPrecondition(f"registry stored {answered} for {desc.digest}")


def _range_start(content_range: str) -> int:
    # "bytes 100-199/200"
    try:
        unit, _, rest = content_range.partition(" ")
        return int(rest.split("-", 1)[0]) if unit == "bytes" else -1
    except ValueError:
        return -1


async def _counted(chunks: AsyncIterable[bytes], progress: Callable[[int], None] | None
                   ) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        if progress is not None:
            progress(len(chunk))
        yield chunk


async def _collect(chunks: AsyncIterable[bytes], n: int) -> bytes:
    out = bytearray()
    async for chunk in chunks:
        out += chunk[: n - len(out)]
        if len(out) >= n:
            break
    if len(out) != n:
        raise errdefs.FailedPrecondition(f"content shorter than expected ({len(out)} < {n})")
    # Stop the producer: an async generator left open would hold its reader.
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()
    return bytes(out)
