"""Registry authentication, without I/O: challenges in, requests and headers out.

A registry answers 401 with ``WWW-Authenticate`` challenges (RFC 7235). ``Basic``
means: send the credentials with every request. ``Bearer realm=...,service=...,scope=...``
(the Docker token protocol) means: fetch a token from ``realm`` for the scopes the
request needs, then send ``Authorization: Bearer <token>``. :class:`Authorizer` keeps
that state per host; the HTTP client only carries out the :class:`TokenRequest` it is
handed and feeds the answer back.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

from berth.core import errdefs

# Tokens that say nothing about their lifetime are good for 60 s (the token spec).
DEFAULT_TOKEN_SECONDS = 60
# Refresh a token this long before it expires.
EXPIRY_MARGIN = 5.0

_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
                   "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_TOKEN68 = _TCHAR | frozenset("/=")


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lowercase: "basic", "bearer"
    params: dict[str, str] = field(default_factory=dict)
    token68: str = ""


class _Lexer:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def token(self, chars: frozenset[str] = _TCHAR) -> str:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in chars:
            self.pos += 1
        return self.text[start:self.pos]

    def quoted(self) -> str:
        # At the opening quote; backslash escapes the next character.
        self.pos += 1
        out = []
        while self.pos < len(self.text):
            c = self.text[self.pos]
            self.pos += 1
            if c == "\\" and self.pos < len(self.text):
                out.append(self.text[self.pos])
                self.pos += 1
            elif c == '"':
                return "".join(out)
            else:
                out.append(c)
        raise errdefs.InvalidArgument("WWW-Authenticate: unterminated quoted string")


def parse_challenges(header: str | Iterable[str]) -> list[Challenge]:
    """All challenges in one or more ``WWW-Authenticate`` header values.

    Parameter names are lowercased; values are unquoted. A malformed header yields
    the challenges before the damage (clients should try what they understood).
    """
    values = [header] if isinstance(header, str) else list(header)
    out: list[Challenge] = []
    for value in values:
        lx = _Lexer(value)
        try:
            _parse_value(lx, out)
        except errdefs.InvalidArgument:
            continue
    return out


def _parse_value(lx: _Lexer, out: list[Challenge]) -> None:
    # Commas separate both the parameters of a challenge and the challenges: a name
    # followed by "=" and a value is a parameter; a word right after the scheme (no
    # comma between) that is not one is a token68; any other name starts a challenge.
    current: Challenge | None = None
    after_scheme = False
    while True:
        lx.skip_ws()
        while lx.peek() == ",":
            lx.pos += 1
            lx.skip_ws()
            after_scheme = False
        if not lx.peek():
            return
        start = lx.pos
        name = lx.token()
        if not name:
            raise errdefs.InvalidArgument("WWW-Authenticate: expected a name")
        lx.skip_ws()
        if current is not None and lx.peek() == "=" and not _token68_end(lx):
            lx.pos += 1
            lx.skip_ws()
            value = lx.quoted() if lx.peek() == '"' else lx.token()
            current.params[name.lower()] = value
            after_scheme = False
            continue
        if current is not None and after_scheme:
            lx.pos = start
            out[-1] = Challenge(current.scheme, {}, lx.token(_TOKEN68))
            current, after_scheme = None, False
            continue
        current = Challenge(name.lower(), {}, "")
        out.append(current)
        after_scheme = True


def _token68_end(lx: _Lexer) -> bool:
    """At "=": True when it only pads a token68 (what follows is "=", "," or the end)."""
    i = lx.pos + 1
    while i < len(lx.text) and lx.text[i] in " \t":
        i += 1
    return i >= len(lx.text) or lx.text[i] in ",="


@dataclass(frozen=True)
class Credentials:
    username: str = ""
    password: str = ""

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def parse_credentials(text: str) -> Credentials:
    """``user:password`` (ctr's --user form); a bare user has an empty password."""
    user, _, password = text.partition(":")
    return Credentials(user, password)


def repository_scope(repository: str, *actions: str) -> str:
    return f"repository:{repository}:{','.join(actions or ('pull',))}"


def merge_scopes(scopes: Iterable[str]) -> list[str]:
    """One scope per resource with the union of actions, in a stable order."""
    merged: dict[str, list[str]] = {}
    for scope in scopes:
        for one in scope.split(" "):
            if not one:
                continue
            resource, _, actions = one.rpartition(":")
            if not resource:
                resource, actions = one, ""
            have = merged.setdefault(resource, [])
            for a in actions.split(","):
                if a and a not in have:
                    have.append(a)
    return [f"{r}:{','.join(sorted(a))}" if a else r for r, a in sorted(merged.items())]


@dataclass(frozen=True)
class TokenRequest:
    """A GET the client must send to obtain a bearer token."""

    url: str
    headers: dict[str, str]
    scopes: tuple[str, ...]


def token_request(challenge: Challenge, scopes: Sequence[str],
                  credentials: Credentials | None) -> TokenRequest:
    realm = challenge.params.get("realm", "")
    parts = urlsplit(realm)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise errdefs.InvalidArgument(f"bearer challenge has no usable realm: {realm!r}")
    all_scopes = merge_scopes([*scopes, *challenge.params.get("scope", "").split(" ")])
    query: list[tuple[str, str]] = []
    if challenge.params.get("service"):
        query.append(("service", challenge.params["service"]))
    query.extend(("scope", s) for s in all_scopes)
    if credentials and credentials.username:
        query.append(("account", credentials.username))
    sep = "&" if parts.query else "?"
    url = realm + (sep + urlencode(query) if query else "")
    headers = {"Authorization": credentials.basic()} if credentials else {}
    return TokenRequest(url, headers, tuple(all_scopes))


@dataclass(frozen=True)
class Token:
    value: str
    expires_at: float  # time.monotonic() based

    def valid(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return now < self.expires_at - EXPIRY_MARGIN


def parse_token_response(body: bytes, now: float | None = None) -> Token:
    """The token server's JSON: ``token`` (or OAuth's ``access_token``), ``expires_in``."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise errdefs.InvalidArgument(f"token response: {e}") from None
    if not isinstance(doc, dict):
        raise errdefs.InvalidArgument("token response must be a JSON object")
    value = doc.get("token") or doc.get("access_token")
    if not isinstance(value, str) or not value:
        raise errdefs.InvalidArgument("token response has no token")
    expires = doc.get("expires_in")
    if not isinstance(expires, int) or isinstance(expires, bool) or expires <= 0:
        expires = DEFAULT_TOKEN_SECONDS
    now = time.monotonic() if now is None else now
    return Token(value, now + expires)


class Unauthorized(errdefs.BerthError):
    code = errdefs.Code.UNAUTHENTICATED
    suffix = "unauthorized"


class Authorizer:
    """Per-host authentication state for one client.

    ``header(scopes)`` gives the Authorization header to send (None: none known yet).
    After a 401, ``challenged(challenges, scopes)`` decides: a :class:`TokenRequest` to
    carry out (then ``token_received``), True to retry with Basic credentials now
    known to be wanted, or raises :class:`Unauthorized` when retrying cannot help.
    """

    def __init__(self, credentials: Credentials | None = None) -> None:
        self.credentials = credentials
        self._basic = False
        self._bearer: Challenge | None = None
        self._tokens: dict[tuple[str, ...], Token] = {}
        self._failed: set[tuple[str, ...]] = set()

    def header(self, scopes: Sequence[str], now: float | None = None) -> str | None:
        if self._bearer is not None:
            key = tuple(merge_scopes(scopes))
            token = self._tokens.get(key)
            if token is None:
                # A token for more scopes than needed serves as well.
                for k, t in self._tokens.items():
                    if set(key) <= set(k) and t.valid(now):
                        token = t
                        break
            if token is not None and token.valid(now):
                return f"Bearer {token.value}"
            return None
        if self._basic and self.credentials is not None:
            return self.credentials.basic()
        return None

    def needs_token(self, scopes: Sequence[str], now: float | None = None) -> TokenRequest | None:
        """Before a request: the token to fetch first, when the host wants bearer tokens."""
        if self._bearer is None or self.header(scopes, now) is not None:
            return None
        return token_request(self._bearer, scopes, self.credentials)

    def challenged(self, challenges: Sequence[Challenge], scopes: Sequence[str],
                   sent: str | None) -> TokenRequest | bool:
        for ch in challenges:
            if ch.scheme == "bearer":
                key = tuple(merge_scopes(scopes))
                if sent is not None and sent.startswith("Bearer ") and key in self._failed:
                    raise Unauthorized("registry refused the token")
                if sent is not None and sent.startswith("Bearer "):
                    # Our token was refused (expired, or too few scopes): one more try.
                    self._failed.add(key)
                    self._tokens.pop(key, None)
                self._bearer = ch
                return token_request(ch, scopes, self.credentials)
        for ch in challenges:
            if ch.scheme == "basic":
                if self.credentials is None:
                    raise Unauthorized("registry wants credentials (basic auth)")
                if sent is not None and sent.startswith("Basic "):
                    raise Unauthorized("registry refused the credentials")
                self._basic = True
                return True
        raise Unauthorized("no supported authentication challenge")

    def token_received(self, request: TokenRequest, scopes: Sequence[str], token: Token) -> None:
        self._tokens[tuple(merge_scopes(scopes))] = token
        self._tokens[request.scopes] = token
