"""One audit record, its canonical encoding and its hash; and where a stored one was read.

A record says who did what, when, to which task, and carries a digest of the
task's arguments, never the arguments themselves (they may hold personal data,
and an audit log is kept for longer and read by more people than a queue).

The hash is sha256 over the canonical JSON of every field but `hash` itself
(sorted keys, no spaces, UTF-8): the same record gives the same bytes on any
host and any Python, so a verifier elsewhere recomputes it exactly. Parsing is
strict (exact field set, exact types) so that what is hashed is what was read.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

__all__ = [
    "CHECKPOINT",
    "GENESIS",
    "Action",
    "AuditRecord",
    "Entry",
    "args_digest",
    "canonical",
    "parse_entry",
    "utc_stamp",
]

#: Format version of a record; a verifier refuses versions it does not know.
VERSION = 1
#: The `prev` of the first record of a chain.
GENESIS = "0" * 64
#: The action of a signed checkpoint record (written by the log itself, never by a caller).
CHECKPOINT = "audit.checkpoint"

#: Hostile text (a refused message's reason) is cut to this many characters per field.
MAX_TEXT = 1024
MAX_DETAILS = 32

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ACTION = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")


class Action(StrEnum):
    """The security-relevant events the fleet records (any `a.b` name is accepted too)."""

    MESSAGE_ACCEPTED = "message.accepted"
    MESSAGE_REJECTED = "message.rejected"
    MESSAGE_EXECUTED = "message.executed"
    KEY_USED = "key.used"
    KEY_CREATED = "key.created"
    KEY_ROTATED = "key.rotated"
    KEY_REVOKED = "key.revoked"
    BREAKER_FORCED = "breaker.forced"
    BREAKER_RESET = "breaker.reset"
    SERVICE_DEGRADED = "service.degraded"
    DEADLETTER_REPLAYED = "deadletter.replayed"
    ALERT_SILENCED = "alert.silenced"


def args_digest(body: bytes) -> str:
    """The sha256 hex of a task's serialized arguments: what a record keeps instead of them."""
    return hashlib.sha256(body).hexdigest()


def canonical(data: Mapping[str, Any]) -> bytes:
    """The one byte encoding that is hashed and signed."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8")


def utc_stamp(moment: datetime | None = None) -> str:
    """`2025-01-31T12:00:00.123456Z`: UTC, microseconds, sortable as text."""
    moment = moment or datetime.now(UTC)
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    # isoformat is C and a tenth of strftime's cost: one is made for every record.
    return moment.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def clean_text(value: str, limit: int = MAX_TEXT) -> str:
    """`value` cut to `limit` characters, with lone surrogates replaced.

    A string that cannot be encoded as UTF-8 would make every later write of the
    batch fail: one hostile reason must not stop the log.
    """
    if len(value) > limit:
        value = value[: limit - 1] + "…"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value


def clean_details(details: Mapping[str, str] | None) -> dict[str, str]:
    """A copy of `details` with text keys and values, at most `MAX_DETAILS` of them."""
    if not details:
        return {}
    if len(details) > MAX_DETAILS:
        raise ValueError(f"at most {MAX_DETAILS} details per record, got {len(details)}")
    out = {}
    for name, value in details.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(f"details are text only (str: str), got {name!r}: {value!r}")
        out[clean_text(name, 64)] = clean_text(value)
    return out


def check_action(action: str) -> str:
    if not _ACTION.match(action):
        raise ValueError(f"action {action!r}: expected a dotted lower-case name like 'key.used'")
    return str(action)


def check_digest(digest: str | None) -> str | None:
    """A digest is 64 lower-case hex digits: this refuses an argument passed in its place."""
    if digest is not None and not _HEX64.match(digest):
        raise ValueError("args_digest must be a sha256 hex digest (use audit.args_digest(body))")
    return digest


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditRecord:
    """One link of one writer's chain: an event, or a signed checkpoint."""

    writer: str
    seq: int
    prev: str
    at: str
    actor: str
    action: str
    task_id: str | None = None
    args_digest: str | None = None
    details: Mapping[str, str] = field(default_factory=dict)
    #: Checkpoints only: the base64 Ed25519 signature of (writer, seq, head).
    sig: str | None = None
    v: int = VERSION
    hash: str = ""

    @property
    def is_checkpoint(self) -> bool:
        return self.action == CHECKPOINT

    def body(self) -> dict[str, Any]:
        """Every field but `hash`: what the hash covers."""
        data = {name: getattr(self, name) for name in _BODY}
        data["details"] = dict(self.details)
        return data

    @classmethod
    def hashed(cls, **body: Any) -> AuditRecord:
        """A record of these fields (all but `hash`), with its hash: one encoding, one object."""
        data = {**body, "details": dict(body.get("details") or {})}
        data.setdefault("sig", None)
        data.setdefault("v", VERSION)
        return cls(**data, hash=hashlib.sha256(canonical(data)).hexdigest())

    def compute_hash(self) -> str:
        return hashlib.sha256(canonical(self.body())).hexdigest()

    def to_json(self) -> str:
        """One line of the file sink or one stream entry: canonical, with the hash."""
        return canonical({**self.body(), "hash": self.hash}).decode("utf-8")

    @classmethod
    def from_json(cls, raw: str | bytes) -> AuditRecord:
        """Parse a stored record strictly; ValueError says what is wrong."""
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"not JSON: {exc}") from None
        return cls.from_mapping(data)

    @classmethod
    def from_mapping(cls, data: object) -> AuditRecord:
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        extra, missing = set(data) - _NAMES, _NAMES - set(data)
        if extra or missing:
            raise ValueError(f"fields added {sorted(extra)} or removed {sorted(missing)}")
        for name, types in _TYPES.items():
            value = data[name]
            if isinstance(value, bool) or not isinstance(value, types):
                raise ValueError(f"field {name!r} has a value of the wrong type: {value!r}")
        details = data["details"]
        if not all(isinstance(v, str) for v in details.values()):
            raise ValueError("field 'details' holds a value that is not text")
        if data["v"] != VERSION:
            raise ValueError(f"record version {data['v']!r}; this verifier knows {VERSION}")
        return cls(**data)


_NAMES = frozenset(f.name for f in fields(AuditRecord))
#: The fields the hash covers, in declaration order (a plain walk: `asdict` deep-copies).
_BODY = tuple(f.name for f in fields(AuditRecord) if f.name != "hash")
_TYPES: dict[str, type | tuple[type, ...]] = {
    "writer": str,
    "seq": int,
    "prev": str,
    "at": str,
    "actor": str,
    "action": str,
    "task_id": (str, type(None)),
    "args_digest": (str, type(None)),
    "details": dict,
    "sig": (str, type(None)),
    "v": int,
    "hash": str,
}


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored record and where it was read (a file and line, or the stream and entry id).

    `record` is None when the stored text does not parse; `error` says why, and
    `writer`/`seq` are what could still be read of it.
    """

    source: str
    position: int | str
    record: AuditRecord | None
    error: str = ""
    writer: str | None = None
    seq: int | None = None


def parse_entry(raw: str | bytes, source: str, position: int | str) -> Entry:
    """An `Entry` for one stored line or stream entry; never raises."""
    try:
        record = AuditRecord.from_json(raw)
    except ValueError as exc:
        writer, seq = None, None
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            data = None
        if isinstance(data, dict):
            writer = data["writer"] if isinstance(data.get("writer"), str) else None
            seq_value = data.get("seq")
            if isinstance(seq_value, int) and not isinstance(seq_value, bool):
                seq = seq_value
        return Entry(source, position, None, str(exc), writer, seq)
    return Entry(source, position, record, "", record.writer, record.seq)
