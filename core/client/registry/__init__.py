"""OCI distribution (registry) client: authentication and the HTTP API."""

from berth.core.distribution.auth import Authorizer, Credentials, Unauthorized, parse_challenges
from berth.core.distribution.client import BlobStream, Registry, RegistryError, TLSOptions

__all__ = [
    "Authorizer",
    "BlobStream",
    "Credentials",
    "Registry",
    "RegistryError",
    "TLSOptions",
    "Unauthorized",
    "parse_challenges",
]
