"""OCI distribution (registry) client: authentication and the HTTP API."""

from berth.core.client.registry.auth import Authorizer, Credentials, Unauthorized, parse_challenges
from berth.core.client.registry.client import BlobStream, Registry, RegistryError, TLSOptions

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
