"""Image references: containerd's plain ``host/path:tag@digest`` specs and Docker's
familiar names (``busybox`` = ``docker.io/library/busybox:latest``).

:func:`parse` is containerd's ``reference.Parse`` (the form ``ctr`` accepts: a host is
required, nothing is rewritten). :func:`parse_docker` normalises as Docker does
(``reference/docker``'s ParseDockerRef): a default domain and ``library/`` for one
component names, ``latest`` when there is neither tag nor digest, a tag dropped when a
digest is given. :func:`familiar` is the reverse, used for docker-archive ``RepoTags``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from berth.core import errdefs

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
NAME_TOTAL_LENGTH_MAX = 255

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]*)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_NAME = rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_REFERENCE = re.compile(rf"({_NAME})(?::({_TAG}))?(?:@({_DIGEST}))?")
_ANCHORED_DIGEST = re.compile(_DIGEST)
_IDENTIFIER = re.compile(r"[a-f0-9]{64}")


@dataclass(frozen=True)
class Spec:
    """containerd's reference.Spec: ``locator`` is host/path, ``object`` tag and/or digest."""

    locator: str
    object: str = ""

    @property
    def hostname(self) -> str:
        return self.locator.split("/", 1)[0]

    @property
    def repository(self) -> str:
        """The path below the host (what a registry calls the name)."""
        _, _, path = self.locator.partition("/")
        return path

    @property
    def tag(self) -> str:
        return self.object.partition("@")[0]

    @property
    def digest(self) -> str:
        _, at, dgst = self.object.partition("@")
        return dgst if at else ""

    def __str__(self) -> str:
        if not self.object:
            return self.locator
        if self.object.startswith("@"):
            return self.locator + self.object
        return f"{self.locator}:{self.object}"


def parse(ref: str) -> Spec:
    """containerd's reference.Parse: ``host[:port]/path[:tag][@digest]``."""
    if "://" in ref:
        raise errdefs.InvalidArgument(f"{ref}: invalid reference")
    # As a URL: a query or fragment is not part of the reference.
    raw = ref.split("#", 1)[0].split("?", 1)[0]
    host, slash, path = raw.partition("/")
    if not host or host.startswith((":", "@")):
        raise errdefs.InvalidArgument(f"{ref}: hostname required")
    if "@" in host or " " in raw:
        raise errdefs.InvalidArgument(f"{ref}: invalid reference")
    obj = ""
    m = re.search(r"[:@]", path)
    if m is not None:
        obj = path[m.start():]
        if obj.startswith(":"):
            obj = obj[1:]
        path = path[:m.start()]
    locator = host + ("/" + _clean_path(path) if slash and path else "")
    return Spec(locator, obj)


def _clean_path(path: str) -> str:
    # path.Join's cleaning of the part after the host.
    parts: list[str] = []
    for p in path.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if parts:
                parts.pop()
            continue
        parts.append(p)
    return "/".join(parts)


@dataclass(frozen=True)
class Named:
    """A Docker reference, normalised: ``domain/path[:tag][@digest]``."""

    domain: str
    path: str
    tag: str = ""
    digest: str = ""

    @property
    def name(self) -> str:
        return f"{self.domain}/{self.path}"

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += ":" + self.tag
        if self.digest:
            out += "@" + self.digest
        return out

    def familiar(self) -> str:
        """Docker's FamiliarString: the default domain and ``library/`` left out."""
        path = self.path
        if self.domain == DEFAULT_DOMAIN:
            short = path.removeprefix(OFFICIAL_REPO_PREFIX)
            if short != path and "/" not in short:
                path = short
            out = path
        else:
            out = f"{self.domain}/{path}"
        if self.tag:
            out += ":" + self.tag
        if self.digest:
            out += "@" + self.digest
        return out

    def spec(self) -> Spec:
        return parse(str(self))


def _split_domain(name: str) -> tuple[str, str]:
    first, slash, rest = name.partition("/")
    if not slash or ("." not in first and ":" not in first and first != "localhost"
                     and first.lower() == first):
        domain, remainder = DEFAULT_DOMAIN, name
    else:
        domain, remainder = first, rest
    if domain == LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in remainder:
        remainder = OFFICIAL_REPO_PREFIX + remainder
    return domain, remainder


def parse_normalized(ref: str) -> Named:
    """Docker's ParseNormalizedNamed: no tag is added."""
    if _IDENTIFIER.fullmatch(ref):
        raise errdefs.InvalidArgument(
            f"invalid repository name ({ref}), cannot specify 64-byte hexadecimal strings")
    domain, remainder = _split_domain(ref)
    remote = re.split(r"[:@]", remainder, maxsplit=1)[0]
    if remote.lower() != remote:
        raise errdefs.InvalidArgument(
            f"{ref}: invalid reference format: repository name must be lowercase", raw=True)
    m = _REFERENCE.fullmatch(f"{domain}/{remainder}")
    if m is None:
        raise errdefs.InvalidArgument(f"{ref}: invalid reference format", raw=True)
    name, tag, dgst = m.group(1), m.group(2) or "", m.group(3) or ""
    if len(name) > NAME_TOTAL_LENGTH_MAX:
        raise errdefs.InvalidArgument(
            f"{ref}: repository name must not be more than {NAME_TOTAL_LENGTH_MAX} characters")
    d, _, path = name.partition("/")
    return Named(d, path, tag, dgst)


def parse_docker(ref: str) -> Named:
    """Docker's ParseDockerRef: normalised, ``latest`` when untagged, tag dropped with a
    digest."""
    named = parse_normalized(ref)
    if named.digest:
        return Named(named.domain, named.path, "", named.digest)
    if not named.tag:
        return Named(named.domain, named.path, DEFAULT_TAG, "")
    return named


def normalize(ref: str) -> str:
    """The full form of a familiar name (what ``berth images pull busybox`` pulls)."""
    return str(parse_docker(ref))


def familiar(ref: str) -> str:
    """A name as Docker shows it (``busybox:latest``), tagged ``latest`` when untagged."""
    named = parse_normalized(ref)
    if not named.tag and not named.digest:
        named = Named(named.domain, named.path, DEFAULT_TAG)
    return named.familiar()


def oci_ref_name(name: str) -> str:
    """The ``org.opencontainers.image.ref.name`` for an image name: its tag/digest part."""
    try:
        return parse(name).object
    except errdefs.InvalidArgument:
        return name


def is_digest(text: str) -> bool:
    return bool(_ANCHORED_DIGEST.fullmatch(text))
