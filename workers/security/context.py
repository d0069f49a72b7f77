"""This process's security: its signing identity and the fleet's trust store.

Loaded from the settings once per process (`security()`); the trust store file
is re-read when it changes, checked at most every `RECHECK` seconds, so a key
revoked with `bulwark keys revoke` is refused fleet-wide within 2 s. A trust
file that no longer parses is logged and the last good store is kept.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from policies.audit import load_public_key
from policies.trust import PUBLISHED, TrustStore, key_id, read_published
from workers.resources import policy_redis
from workers.security.keys import KeyFileError, load_private_key, read_trust
from workers.settings import SecuritySettings, SettingsError, get_settings

__all__ = ["RECHECK", "Security", "SecurityOff", "TrustCache", "forget", "security"]

logger = logging.getLogger(__name__)

RECHECK = 2.0


class SecurityOff(UserWarning):
    """Security was turned off: messages are neither signed nor verified."""


class _Rechecked:
    """A trust store read again at most every `recheck` seconds; a read that fails or is
    refused keeps the last good store (`_read` returns None)."""

    def __init__(self, *, recheck: float) -> None:
        self.recheck = recheck
        self._lock = threading.Lock()
        self._checked = float("-inf")
        self._store = TrustStore()

    def get(self) -> TrustStore:
        now = time.monotonic()
        if now - self._checked < self.recheck:
            return self._store
        with self._lock:
            self._checked = now
            found = self._read()
            if found is not None:
                self._store = found
        return self._store

    def _read(self) -> TrustStore | None:
        raise NotImplementedError


class TrustCache(_Rechecked):
    """The trust store in `path`, re-read when the file changes."""

    def __init__(self, path: str | Path, *, recheck: float = RECHECK) -> None:
        super().__init__(recheck=recheck)
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self.get()

    def _read(self) -> TrustStore | None:
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp == self._stamp:
            return None
        try:
            store = read_trust(self.path)
        except KeyFileError as exc:
            logger.error("trust store not reloaded, keeping the last good one: %s", exc)
            return None
        self._stamp = stamp
        return store


class PublishedTrust(_Rechecked):
    """The trust store published in Redis, accepted only if the admin root key signed it.

    Re-read every `recheck` seconds (one GET); a value that is unsigned, badly
    signed, malformed, or older than the newest version seen (a rollback to a
    store from before a revocation) is refused with an error log, and the last
    good store is kept. Until a first good one, nothing is trusted.
    """

    def __init__(self, client: Any, root: Ed25519PublicKey, *, recheck: float = RECHECK) -> None:
        super().__init__(recheck=recheck)
        self.client = client
        self.root = root
        self.version = -1
        self._last_refusal = ""

    def _read(self) -> TrustStore | None:
        try:
            raw = self.client.get(PUBLISHED)
        except redis.RedisError as exc:
            logger.warning("published trust store unreadable, keeping the last: %s", exc)
            return None
        if raw is None:
            return None
        found = read_published(self.root, raw)
        if isinstance(found, str) or found[1] < self.version:
            refusal = found if isinstance(found, str) else (
                f"published trust store version {found[1]} is older than {self.version} "
                "(a rollback): refused"
            )  # fmt: skip
            if refusal != self._last_refusal:
                logger.error("%s; keeping version %d", refusal, self.version)
                self._last_refusal = refusal
            return None
        store, self.version = found
        return store


@dataclass(frozen=True)
class Security:
    """What this process needs to sign and to verify."""

    settings: SecuritySettings
    trust: TrustCache | PublishedTrust | None
    identity: str | None
    key: Ed25519PrivateKey | None

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    @functools.cached_property
    def kid(self) -> str | None:
        """The signing key's id (hashed once, not at every message signed)."""
        return key_id(self.key.public_key()) if self.key is not None else None

    def signing_problem(self) -> str | None:
        """Why this process cannot sign, or None."""
        if self.identity is None or self.key is None:
            return (
                "security is on but this process has no identity: set BULWARK_IDENTITY and "
                "BULWARK_SIGNING_KEY_FILE (`bulwark keys new-producer NAME`), "
                "or BULWARK_SECURITY=off"
            )
        return None

    def verifying_problem(self) -> str | None:
        """Why this process cannot verify messages, or None."""
        if self.trust is None:
            return (
                "security is on but neither BULWARK_TRUST_FILE nor BULWARK_TRUST_ROOT_KEY_FILE "
                "is set (`bulwark keys init`)"
            )
        return None


@functools.cache
def security() -> Security:
    """This process's security context (from the settings; cached)."""
    settings = get_settings().security
    if not settings.enabled:
        warnings.warn(
            "BULWARK_SECURITY=off: task messages are neither signed nor verified; any "
            "process that can write to Redis can run any task",
            SecurityOff,
            stacklevel=2,
        )
        return Security(settings, None, None, None)
    key = None
    if settings.signing_key_file is not None:
        try:
            key = load_private_key(settings.signing_key_file)
        except KeyFileError as exc:
            raise SettingsError([f"BULWARK_SIGNING_KEY_FILE: {exc}"]) from None
    return Security(settings, _trust(settings), settings.identity, key)


def _trust(settings: SecuritySettings) -> TrustCache | PublishedTrust | None:
    if settings.trust_root_key_file:
        try:
            root = load_public_key(settings.trust_root_key_file)
        except (OSError, ValueError) as exc:
            raise SettingsError([f"BULWARK_TRUST_ROOT_KEY_FILE: {exc}"]) from None
        return PublishedTrust(policy_redis(), root)
    return TrustCache(settings.trust_file) if settings.trust_file else None


def forget() -> None:
    security.cache_clear()
