"""The trust store: who may sign messages, with which keys, and what each may send.

A TOML file, public keys only, kept by `bulwark keys` and read by every worker:

    [identities.billing]
    role = "producer"                 # producer | worker | operator
    tasks = ["payments.*"]            # task-name globs it may send (deny by default)
    queues = ["payments"]             # optional: queue globs
    max_payload = 65536               # optional: bytes
    rate = 50.0                       # optional: messages per second, at the client

    [[identities.billing.keys]]
    id = "k5d41402abc4b2a76"          # `key_id` of the public key
    public = "base64 of the 32-byte Ed25519 public key"
    not_before = 2026-11-01T00:00:00Z # optional
    not_after = 2027-11-01T00:00:00Z  # optional
    revoked = false

A worker's own identity (role "worker") may send any task: it re-sends retries,
deferrals, chains and beat's schedule.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from policies import keys
from policies.authz import Grant

__all__ = [
    "PUBLISHED",
    "ROLES",
    "Identity",
    "KeyEntry",
    "TrustError",
    "TrustStore",
    "key_id",
    "publish_value",
    "read_published",
]

ROLES = ("producer", "worker", "operator")
SIGNATURE_BYTES = 64


class TrustError(ValueError):
    """The trust store is malformed; the message names the entry and the problem."""


def key_id(public: Ed25519PublicKey) -> str:
    """A short, stable name of a public key: 'k' and 16 hex digits of its SHA-256."""
    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    digest = hashlib.sha256(raw).hexdigest()
    return "k" + digest[:16]


@dataclass(frozen=True, slots=True)
class KeyEntry:
    id: str
    public: Ed25519PublicKey
    not_before: datetime | None = None
    not_after: datetime | None = None
    revoked: bool = False
    #: The same key for libsodium, which verifies in half of OpenSSL's time (RFC 8032 both).
    _verifier: VerifyKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        raw = self.public.public_bytes(Encoding.Raw, PublicFormat.Raw)
        object.__setattr__(self, "_verifier", VerifyKey(raw))

    def verifies(self, signature: bytes, data: bytes) -> bool:
        """Whether `signature` is this key's Ed25519 signature of `data`."""
        if len(signature) != SIGNATURE_BYTES:
            return False
        try:
            self._verifier.verify(data, signature)
        except BadSignatureError:
            return False
        return True

    def problem(self, now: datetime) -> str | None:
        """Why this key may not sign at `now`; None if it may."""
        if self.revoked:
            return f"key {self.id} is revoked"
        if self.not_before is not None and now < self.not_before:
            return f"key {self.id} is not valid before {self.not_before.isoformat()}"
        if self.not_after is not None and now > self.not_after:
            return f"key {self.id} expired at {self.not_after.isoformat()}"
        return None

    def public_text(self) -> str:
        return base64.b64encode(self.public.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


@dataclass(frozen=True, slots=True)
class Identity:
    name: str
    role: str
    grant: Grant
    keys: tuple[KeyEntry, ...] = ()


@dataclass(frozen=True, slots=True)
class TrustStore:
    identities: Mapping[str, Identity] = field(default_factory=dict)

    def identity(self, name: str) -> Identity | None:
        return self.identities.get(name)

    def key(self, identity: str, kid: str) -> KeyEntry | None:
        found = self.identities.get(identity)
        if found is None:
            return None
        return next((k for k in found.keys if k.id == kid), None)

    def with_identity(self, identity: Identity) -> TrustStore:
        return TrustStore({**self.identities, identity.name: identity})

    def revoke(self, kid: str) -> TrustStore:
        """The store with key `kid` revoked, wherever it is; TrustError if unknown."""
        for ident in self.identities.values():
            keys = tuple(replace(k, revoked=True) if k.id == kid else k for k in ident.keys)
            if keys != ident.keys:
                return self.with_identity(replace(ident, keys=keys))
        raise TrustError(f"no key {kid!r} in the trust store")

    # -- TOML -------------------------------------------------------------------------------

    @classmethod
    def from_toml(cls, text: str) -> TrustStore:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise TrustError(f"trust store is not TOML: {exc}") from None
        section = data.get("identities", {})
        if not isinstance(section, dict):
            raise TrustError("[identities] must be a table")
        return cls({name: _identity(name, entry) for name, entry in section.items()})

    def to_toml(self) -> str:
        lines = ["# Bulwark trust store (public keys only); kept by `bulwark keys`.", ""]
        for ident in sorted(self.identities.values(), key=lambda i: i.name):
            g = ident.grant
            lines += [f"[identities.{_quote(ident.name)}]", f"role = {_quote(ident.role)}"]
            lines.append(f"tasks = [{', '.join(_quote(t) for t in g.tasks)}]")
            if g.queues:
                lines.append(f"queues = [{', '.join(_quote(q) for q in g.queues)}]")
            if g.max_payload is not None:
                lines.append(f"max_payload = {g.max_payload}")
            if g.rate is not None:
                lines.append(f"rate = {g.rate!r}")
            lines.append("")
            for k in ident.keys:
                lines += [
                    f"[[identities.{_quote(ident.name)}.keys]]",
                    f"id = {_quote(k.id)}",
                    f"public = {_quote(k.public_text())}",
                ]
                for label, when in (("not_before", k.not_before), ("not_after", k.not_after)):
                    if when is not None:
                        lines.append(f"{label} = {when.strftime('%Y-%m-%dT%H:%M:%SZ')}")
                lines += [f"revoked = {'true' if k.revoked else 'false'}", ""]
        return "\n".join(lines)


#: Where a published trust store lives in Redis (`publish`), for fleets on many hosts.
PUBLISHED = keys.key("trust", "store", "signed")
_STORE_DOMAIN = b"bulwark-trust-store-v1\n"


def publish_value(root: Ed25519PrivateKey, store: TrustStore, version: int) -> str:
    """The Redis value of `store`, version `version`, signed by the admin root key."""
    text = store.to_toml()
    signed = _STORE_DOMAIN + str(version).encode() + b"\n" + text.encode()
    signature = base64.b64encode(root.sign(signed)).decode()
    return json.dumps({"version": version, "toml": text, "sig": signature})


def read_published(root: Ed25519PublicKey, raw: bytes | str) -> tuple[TrustStore, int] | str:
    """(store, version) of a published value, if the root key signed it; else why not."""
    try:
        value = json.loads(raw)
        version, text, sig = value["version"], value["toml"], value["sig"]
    except (ValueError, TypeError, KeyError):
        return "published trust store is not {version, toml, sig}"
    if not (isinstance(version, int) and isinstance(text, str) and isinstance(sig, str)):
        return "published trust store has fields of the wrong types"
    signed = _STORE_DOMAIN + str(version).encode() + b"\n" + text.encode()
    try:
        root.verify(base64.b64decode(sig, validate=True), signed)
    except (InvalidSignature, binascii.Error, ValueError):
        return f"published trust store version {version} is not signed by the root key"
    try:
        return TrustStore.from_toml(text), version
    except TrustError as exc:
        return f"published trust store version {version}: {exc}"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _strings(where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise TrustError(f"{where} must be a list of non-empty strings")
    return tuple(value)


def _identity(name: str, entry: Any) -> Identity:
    where = f"identities.{name}"
    if not isinstance(entry, dict):
        raise TrustError(f"{where} must be a table")
    role = entry.get("role", "producer")
    if role not in ROLES:
        raise TrustError(f"{where}.role is {role!r}: one of {', '.join(ROLES)}")
    default_tasks = ["*"] if role in ("worker", "operator") else []
    max_payload = entry.get("max_payload")
    if max_payload is not None and (not isinstance(max_payload, int) or max_payload <= 0):
        raise TrustError(f"{where}.max_payload must be a whole number of bytes > 0")
    rate = entry.get("rate")
    if rate is not None and (not isinstance(rate, int | float) or rate <= 0):
        raise TrustError(f"{where}.rate must be a number of messages per second > 0")
    grant = Grant(
        tasks=_strings(f"{where}.tasks", entry.get("tasks", default_tasks)),
        queues=_strings(f"{where}.queues", entry.get("queues", [])),
        max_payload=max_payload,
        rate=float(rate) if rate is not None else None,
    )
    keys = entry.get("keys", [])
    if not isinstance(keys, list):
        raise TrustError(f"{where}.keys must be an array of tables")
    return Identity(
        name, role, grant, tuple(_key(f"{where}.keys[{i}]", k) for i, k in enumerate(keys))
    )


def _when(where: str, value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise TrustError(f"{where} must be a TOML date-time (2026-11-01T00:00:00Z)")
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _key(where: str, entry: Any) -> KeyEntry:
    if not isinstance(entry, dict):
        raise TrustError(f"{where} must be a table")
    try:
        raw = base64.b64decode(str(entry.get("public", "")), validate=True)
        public = Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError):
        raise TrustError(f"{where}.public is not a base64 Ed25519 public key (32 bytes)") from None
    kid = entry.get("id", key_id(public))
    if kid != key_id(public):
        raise TrustError(f"{where}.id {kid!r} does not name its public key ({key_id(public)})")
    revoked = entry.get("revoked", False)
    if not isinstance(revoked, bool):
        raise TrustError(f"{where}.revoked must be true or false")
    return KeyEntry(
        kid,
        public,
        _when(f"{where}.not_before", entry.get("not_before")),
        _when(f"{where}.not_after", entry.get("not_after")),
        revoked,
    )
