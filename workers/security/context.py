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

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from policies.trust import TrustStore, key_id
from workers.security.keys import KeyFileError, load_private_key, read_trust
from workers.settings import SecuritySettings, SettingsError, get_settings

__all__ = ["RECHECK", "Security", "SecurityOff", "TrustCache", "forget", "security"]

logger = logging.getLogger(__name__)

RECHECK = 2.0


class SecurityOff(UserWarning):
    """Security was turned off: messages are neither signed nor verified."""


class TrustCache:
    """The trust store in `path`, re-read when the file changes."""

    def __init__(self, path: str | Path, *, recheck: float = RECHECK) -> None:
        self.path = Path(path)
        self.recheck = recheck
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._checked = float("-inf")
        self._store = TrustStore()
        self.get()

    def get(self) -> TrustStore:
        now = time.monotonic()
        if now - self._checked < self.recheck:
            return self._store
        with self._lock:
            self._checked = now
            try:
                st = os.stat(self.path)
                stamp = (st.st_mtime_ns, st.st_size)
            except OSError:
                stamp = None
            if stamp != self._stamp:
                try:
                    self._store = read_trust(self.path)
                    self._stamp = stamp
                except KeyFileError as exc:
                    logger.error("trust store not reloaded, keeping the last good one: %s", exc)
        return self._store


@dataclass(frozen=True)
class Security:
    """What this process needs to sign and to verify."""

    settings: SecuritySettings
    trust: TrustCache | None
    identity: str | None
    key: Ed25519PrivateKey | None

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    @property
    def kid(self) -> str | None:
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
            return "security is on but BULWARK_TRUST_FILE is not set (`bulwark keys init`)"
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
    trust = TrustCache(settings.trust_file) if settings.trust_file else None
    return Security(settings, trust, settings.identity, key)


def forget() -> None:
    security.cache_clear()
