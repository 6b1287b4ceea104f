"""Who is calling: API keys to projects. Keys are only ever held as SHA-256 digests.

Never logs, stores or echoes a presented key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from zrproxy.config import ProjectConfig
from zrproxy.errors import InvalidAuth
from zrproxy.headers import IncomingHeaders


def key_digest(key: str) -> str:
    """The SHA-256 hex digest of a key as presented, the form `key_sha256` holds."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def new_key() -> tuple[str, str]:
    """A new random API key and its SHA-256 hex digest (for `key_sha256`)."""
    key = "zr-" + secrets.token_urlsafe(32)
    return key, key_digest(key)


def presented_key(headers: IncomingHeaders) -> str | None:
    """The key from `Authorization: Bearer KEY` or `x-api-key: KEY`."""
    value = headers.get("Authorization")
    if value is not None:
        scheme, _, key = value.partition(" ")
        if scheme.lower() == "bearer" and key.strip():
            return key.strip()
        return None
    api_key = headers.get("x-api-key")
    return api_key.strip() if api_key and api_key.strip() else None


class Authenticator:
    """Maps a presented key to its project.

    The lookup is by the key's SHA-256 digest: a dict probe's timing depends only on
    the digest, which tells an attacker nothing about any valid key; the final check
    is `hmac.compare_digest` all the same.
    """

    def __init__(self, projects: tuple[ProjectConfig, ...]) -> None:
        self._by_digest = {d: p for p in projects for d in p.key_sha256}

    def authenticate(self, headers: IncomingHeaders) -> ProjectConfig:
        key = presented_key(headers)
        if key is None:
            raise InvalidAuth()
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        del key
        project = self._by_digest.get(digest)
        if project is None:
            raise InvalidAuth()
        for candidate in project.key_sha256:
            if hmac.compare_digest(candidate, digest):
                return project
        raise InvalidAuth()  # unreachable unless the dict and tuple disagree
