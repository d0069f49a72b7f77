"""Sealing: optional encryption of task arguments with AES-256-GCM, under a key ring.

Signing (the envelope) proves who sent a message; it does not hide what it
carries. A task's arguments (a card token, an address) sit in Redis, in the
dead-letter store and in Flower; sealing them keeps that text unreadable to
anyone without the data key.

    ring = KeyRing.new()
    token = seal(ring, b'{"card": "..."}', aad, now)     # "v1.<kid>.<nonce+ciphertext>"
    plain = open_sealed(ring, token, aad, now)

`aad` (associated data: task name, task id, producer, jti, ...) is
authenticated but not encrypted: a sealed payload copied into another message
(another task id, another producer, a replayed jti) does not open. The key id
and the token version are bound too, whether or not the caller names them.

Keys rotate without a flag day: `rotate` makes a new active key (every new
seal uses it) and keeps the previous one for decryption until an overlap
deadline, so messages already queued still open; after it the old key is
retired and its bytes are forgotten. Each operation returns a new ring: a
ring in use never changes under a worker's feet.

A fresh random 96-bit nonce per seal is safe for about 2**32 seals per key
(NIST SP 800-38D): rotate well before that. Times are wall-clock seconds
(`time.time()`), since the ring is shared by hosts through a file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import re
import secrets
import stat
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from policies.errors import BulwarkError

__all__ = [
    "DataKey",
    "KeyFileError",
    "KeyRing",
    "SealError",
    "associated_data",
    "key_id",
    "open_sealed",
    "seal",
]

KeyState = Literal["active", "decrypting", "retired"]
STATES: tuple[KeyState, ...] = ("active", "decrypting", "retired")

VERSION = "v1"
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # 96 bits, the size GCM is specified for
TAG_BYTES = 16
#: Key file format marker, so a wrong file is refused by name, not by a KeyError.
FILE_FORMAT = "bulwark-keyring"
FILE_VERSION = 1
#: Permission bits a key file must not have: any access by group or others.
FORBIDDEN_MODE = 0o077

_KID = re.compile(r"^k[0-9a-f]{12}$")
_B64URL = re.compile(r"^[A-Za-z0-9_-]+$")


class SealError(BulwarkError, ValueError):
    """A sealed payload cannot be opened (or made); `reason` is a short code for metrics.

    Reasons: "malformed", "unknown_key", "retired_key", "authentication",
    "no_key", "bad_aad". The message never holds plaintext, ciphertext or key bytes.
    """

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class KeyFileError(BulwarkError, ValueError):
    """A key ring file (or its JSON) is unsafe or unreadable; the message says which and why."""


def key_id(secret: bytes) -> str:
    """The id of a data key: 'k' + the first 12 hex digits of its SHA-256.

    Derived from the key, so a file whose kid does not match its key is caught
    as corrupt; 48 bits of a hash of a 256-bit random key reveal nothing of it.
    """
    return "k" + hashlib.sha256(secret).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class DataKey:
    """One data key of a ring. `secret` is None once retired (its bytes are forgotten)."""

    kid: str
    secret: bytes | None = field(repr=False, compare=False)
    created_at: float
    state: KeyState
    #: End of the overlap of a "decrypting" key (None otherwise).
    retire_after: float | None = None

    def opens_at(self, now: float) -> bool:
        """Whether this key may decrypt at `now` (a decrypting key only before its deadline)."""
        if self.secret is None:
            return False
        if self.state == "active":
            return True
        return (
            self.state == "decrypting" and self.retire_after is not None and now < self.retire_after
        )

    def __repr__(self) -> str:
        until = f" until {self.retire_after:.0f}" if self.retire_after is not None else ""
        return f"DataKey({self.kid} {self.state}{until})"


def _new_key(now: float) -> DataKey:
    secret = secrets.token_bytes(KEY_BYTES)
    return DataKey(kid=key_id(secret), secret=secret, created_at=now, state="active")


def _finite(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number of seconds, not {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class KeyRing:
    """Data keys: exactly one "active", any number "decrypting" or "retired".

    Immutable: `rotate`, `retire` and `expire` return a new ring. Build one with
    `new()`, `from_json()` or `load()`; the constructor checks the invariants.
    """

    keys: tuple[DataKey, ...]

    def __post_init__(self) -> None:
        active = [k.kid for k in self.keys if k.state == "active"]
        if len(active) != 1:
            raise ValueError(f"a key ring needs exactly one active key, not {len(active)}")
        kids = [k.kid for k in self.keys]
        if len(set(kids)) != len(kids):
            raise ValueError("a key ring holds each key id once")
        for key in self.keys:
            _check_key(key)

    @classmethod
    def new(cls, now: float | None = None) -> KeyRing:
        """A ring of one fresh active key."""
        created = time.time() if now is None else _finite(now, "now")
        return cls((_new_key(created),))

    @property
    def active(self) -> DataKey:
        """The key every new seal uses."""
        return next(k for k in self.keys if k.state == "active")

    def get(self, kid: str) -> DataKey | None:
        return next((k for k in self.keys if k.kid == kid), None)

    def rotate(self, now: float, overlap_seconds: float) -> KeyRing:
        """A new active key; the previous one decrypts until `now + overlap_seconds`.

        The overlap must cover how long a sealed message may wait (queue, countdown,
        retries, dead-letter replay): past it, what the old key sealed no longer opens.
        """
        now = _finite(now, "now")
        overlap = _finite(overlap_seconds, "overlap_seconds")
        if overlap < 0:
            raise ValueError(f"overlap_seconds must be >= 0, not {overlap_seconds!r}")
        old = self.active
        demoted = replace(old, state="decrypting", retire_after=now + overlap)
        keys = tuple(demoted if k.kid == old.kid else k for k in self.keys)
        return KeyRing((*keys, _new_key(now)))

    def retire(self, kid: str) -> KeyRing:
        """Retire `kid` now (it neither encrypts nor decrypts; its bytes are dropped).

        The active key cannot be retired: rotate first, so that one key always seals.
        """
        key = self.get(kid)
        if key is None:
            raise KeyError(f"no key {kid!r} in this ring (kids: {', '.join(self.kids)})")
        if key.state == "active":
            raise ValueError(f"key {kid} is the active key: rotate before retiring it")
        retired = _retired(key)
        return KeyRing(tuple(retired if k.kid == kid else k for k in self.keys))

    def expire(self, now: float) -> KeyRing:
        """Retire every decrypting key whose overlap ended at or before `now`."""
        now = _finite(now, "now")
        return KeyRing(
            tuple(
                _retired(k)
                if k.state == "decrypting" and k.retire_after is not None and k.retire_after <= now
                else k
                for k in self.keys
            )
        )

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(k.kid for k in self.keys)

    def to_json(self) -> str:
        """The ring as JSON, keys in standard base64: the content of a key file (a secret)."""
        document = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "keys": [
                {
                    "kid": k.kid,
                    "state": k.state,
                    "created_at": k.created_at,
                    "retire_after": k.retire_after,
                    "key": None if k.secret is None else base64.b64encode(k.secret).decode(),
                }
                for k in self.keys
            ],
        }
        return json.dumps(document, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> KeyRing:
        """Parse and check a ring; `KeyFileError` says what is wrong (never a key's value)."""
        try:
            document = json.loads(text)
        except (ValueError, RecursionError):
            raise KeyFileError("key ring is not valid JSON") from None
        if not isinstance(document, dict) or document.get("format") != FILE_FORMAT:
            raise KeyFileError(f"not a key ring: expected an object with format {FILE_FORMAT!r}")
        if document.get("version") != FILE_VERSION:
            raise KeyFileError(
                f"key ring version {document.get('version')!r} is not supported "
                f"(this Bulwark reads version {FILE_VERSION})"
            )
        entries = document.get("keys")
        if not isinstance(entries, list):
            raise KeyFileError("key ring has no list of keys")
        keys = tuple(_key_from_json(i, entry) for i, entry in enumerate(entries))
        try:
            return cls(keys)
        except ValueError as exc:
            raise KeyFileError(f"invalid key ring: {exc}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the ring to `path` atomically, mode 0600.

        A temporary file in the same folder (created 0600, so the secret is never
        readable by others, not even briefly) is written, synced, then renamed
        over `path`: a reader sees the old ring or the new one, never half of one.
        """
        target = Path(path)
        data = self.to_json().encode()
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeyRing:
        """Read a ring from `path`; refuse a file that group or others may access.

        The mode is checked on the opened file (not the path), so a file swapped
        between the check and the read cannot slip through.
        """
        target = Path(path)
        fd = os.open(target, os.O_RDONLY)
        with os.fdopen(fd, "rb") as source:
            mode = stat.S_IMODE(os.fstat(source.fileno()).st_mode)
            if mode & FORBIDDEN_MODE:
                raise KeyFileError(
                    f"key file {target} has mode {mode:04o}: group or others may access it, "
                    f"and it holds secret keys. Run `chmod 600 {target}` (and rotate the keys "
                    "if others may have read them)."
                )
            text = source.read()
        try:
            return cls.from_json(text)
        except KeyFileError as exc:
            raise KeyFileError(f"key file {target}: {exc}") from None

    def __repr__(self) -> str:
        return "KeyRing(" + ", ".join(repr(k)[len("DataKey(") : -1] for k in self.keys) + ")"


def _retired(key: DataKey) -> DataKey:
    return replace(key, state="retired", secret=None, retire_after=None)


def _check_key(key: DataKey) -> None:
    if key.state not in STATES:
        raise ValueError(f"key {key.kid}: unknown state {key.state!r}")
    if not _KID.match(key.kid):
        raise ValueError(f"key id {key.kid!r} is not 'k' and 12 hex digits")
    if key.state == "retired":
        if key.secret is not None:
            raise ValueError(f"key {key.kid} is retired but still holds its bytes")
        return
    if key.secret is None or len(key.secret) != KEY_BYTES:
        raise ValueError(f"key {key.kid} ({key.state}) needs {KEY_BYTES} key bytes")
    if key_id(key.secret) != key.kid:
        raise ValueError(f"key {key.kid}: its bytes do not match its id (corrupt or edited)")
    if key.state == "decrypting" and key.retire_after is None:
        raise ValueError(f"key {key.kid} is decrypting but has no retire_after deadline")


def _key_from_json(index: int, entry: Any) -> DataKey:
    where = f"key #{index}"
    if not isinstance(entry, dict):
        raise KeyFileError(f"{where} is not an object")
    kid, state, encoded = entry.get("kid"), entry.get("state"), entry.get("key")
    if not isinstance(kid, str) or state not in STATES:
        raise KeyFileError(f"{where} needs a kid and a state ({', '.join(STATES)})")
    where = f"key {kid[:16]!r}"
    created, deadline = _time(entry.get("created_at")), _time(entry.get("retire_after"))
    if created is None or (deadline is None and entry.get("retire_after") is not None):
        raise KeyFileError(f"{where}: created_at and retire_after must be numbers of seconds")
    secret: bytes | None = None
    if encoded is not None:
        if not isinstance(encoded, str):
            raise KeyFileError(f"{where}: key must be base64 text")
        try:
            secret = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise KeyFileError(f"{where}: key is not valid base64") from None
    return DataKey(
        kid=kid,
        secret=secret,
        created_at=created,
        state=cast(KeyState, state),
        retire_after=deadline,
    )


def _time(value: object) -> float | None:
    """`value` as seconds if it is a finite JSON number, else None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (a crash after `save` returns keeps the new ring)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - filesystems that refuse it
        pass
    finally:
        os.close(fd)


# -- sealing ---------------------------------------------------------------------------------------


def associated_data(aad: Mapping[str, str], kid: str) -> bytes:
    """The bytes GCM authenticates besides the ciphertext: canonical JSON of `aad`.

    Sorted keys, no spaces, ASCII only, so producer and worker derive the same
    bytes from the same fields. "kid" and "v" are bound too: the caller may name
    them, and if it does they must match the key and the token version.
    """
    fields: dict[str, str] = {}
    for name, value in aad.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError("associated data maps text to text")
        fields[name] = value
    for name, bound in (("kid", kid), ("v", VERSION)):
        if fields.setdefault(name, bound) != bound:
            raise SealError(
                "bad_aad", f"associated data names {name}={fields[name]!r}, not {bound!r}"
            )
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def seal(ring: KeyRing, plaintext: bytes, aad: Mapping[str, str], now: float) -> str:
    """Encrypt `plaintext` under the ring's active key: "v1.<kid>.<base64url nonce+ct>".

    `now` is the time of sealing; a v1 token does not carry it (the envelope has
    its own expiry), the argument keeps sealing and opening called alike.
    """
    _finite(now, "now")
    key = ring.active
    if key.secret is None:  # pragma: no cover - the ring's invariants forbid it
        raise SealError("no_key", f"active key {key.kid} has no key bytes")
    nonce = secrets.token_bytes(NONCE_BYTES)
    ciphertext = AESGCM(key.secret).encrypt(nonce, bytes(plaintext), associated_data(aad, key.kid))
    body = base64.urlsafe_b64encode(nonce + ciphertext).rstrip(b"=").decode("ascii")
    return f"{VERSION}.{key.kid}.{body}"


def open_sealed(ring: KeyRing, token: str, aad: Mapping[str, str], now: float) -> bytes:
    """The plaintext of `token`, if a usable key of `ring` opens it with this `aad`.

    `SealError` otherwise, its `reason` one of: "malformed", "unknown_key",
    "retired_key" (retired, or a decrypting key past its overlap at `now`),
    "authentication" (tampered with, or moved to another message).
    """
    now = _finite(now, "now")
    kid, blob = _parse(token)
    key = ring.get(kid)
    if key is None:
        raise SealError("unknown_key", f"sealed with key {kid}, which this key ring does not hold")
    if not key.opens_at(now) or key.secret is None:
        when = "" if key.retire_after is None else f" (its overlap ended at {key.retire_after:.0f})"
        raise SealError("retired_key", f"sealed with key {kid}, which is retired{when}")
    try:
        return AESGCM(key.secret).decrypt(
            blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated_data(aad, kid)
        )
    except InvalidTag:
        raise SealError(
            "authentication",
            f"authentication failed for a payload sealed with key {kid}: it was tampered "
            "with, or it belongs to another message (task, producer or jti differ)",
        ) from None


def _parse(token: str) -> tuple[str, bytes]:
    if not isinstance(token, str):
        raise SealError("malformed", "malformed sealed token: not text")
    parts = token.split(".")
    if len(parts) != 3:
        raise SealError("malformed", "malformed sealed token: expected v1.<kid>.<payload>")
    version, kid, body = parts
    if version != VERSION:
        raise SealError(
            "malformed", f"malformed sealed token: version {version[:8]!r} is not {VERSION!r}"
        )
    if not _KID.match(kid):
        raise SealError("malformed", "malformed sealed token: key id is not 'k' and 12 hex digits")
    if not _B64URL.match(body):
        raise SealError("malformed", "malformed sealed token: payload is not base64url")
    try:
        blob = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        raise SealError("malformed", "malformed sealed token: payload is not base64url") from None
    if base64.urlsafe_b64encode(blob).rstrip(b"=").decode("ascii") != body:
        # Spare bits in the last character: another text for the same bytes.
        raise SealError("malformed", "malformed sealed token: payload is not canonical base64url")
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise SealError("malformed", "malformed sealed token: payload too short for nonce and tag")
    return kid, blob
