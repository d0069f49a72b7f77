"""One writer's hash chain: numbering, linking and signing the records it makes.

Each record holds its writer's sequence number and the hash of the writer's
previous record, so removing, reordering or editing one breaks a link. The
links alone prove little against someone who can write the log (sha256 has no
key: they can re-hash everything after an edit), so every so often the writer
appends a checkpoint: a record naming (seq, head hash) of the record before
it, signed with Ed25519 (the signature covers the whole checkpoint record).
Everything up to a checkpoint is then vouched for by a key the log's readers
do not hold.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import replace

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from policies.audit.record import (
    CHECKPOINT,
    GENESIS,
    AuditRecord,
    canonical,
    check_action,
    check_digest,
    clean_details,
    clean_text,
)

__all__ = ["Chain", "checkpoint_claim", "checkpoint_message", "signature_ok"]

#: Prefixed to what a checkpoint signs, so the audit key's signature means nothing elsewhere.
_DOMAIN = b"bulwark-audit-checkpoint/1\n"
#: The actor of checkpoint records.
AUDIT_ACTOR = "audit"


def checkpoint_message(record: AuditRecord) -> bytes:
    """The bytes a checkpoint's signature covers: the whole checkpoint record but its `sig`
    and `hash` (so writer, its seq, the head it links to, and the seq and head it names)."""
    body = record.body()
    body.pop("sig")
    return _DOMAIN + canonical(body)


def checkpoint_claim(record: AuditRecord) -> tuple[int, str] | None:
    """(seq, head) a checkpoint record vouches for, or None if its details are malformed."""
    seq, head = record.details.get("seq", ""), record.details.get("head", "")
    if not seq.isdigit() or len(head) != 64:
        return None
    return int(seq), head


def signature_ok(record: AuditRecord, public_key: Ed25519PublicKey) -> bool:
    """Whether a checkpoint's signature is the audit key's over what it claims."""
    claim = checkpoint_claim(record)
    if claim is None or record.sig is None:
        return False
    try:
        signature = base64.b64decode(record.sig, validate=True)
        public_key.verify(signature, checkpoint_message(record))
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


class Chain:
    """The head of one writer's chain. Not thread-safe: `AuditLog` holds its lock around it."""

    def __init__(self, writer: str, signing_key: Ed25519PrivateKey) -> None:
        if not writer or clean_text(writer, 200) != writer:
            raise ValueError(f"writer id {writer!r}: expected 1 to 200 characters of text")
        self.writer = writer
        self._key = signing_key
        #: Sequence number and hash of the last record made (0 and GENESIS before the first).
        self.seq = 0
        self.head = GENESIS
        #: Records made since the last checkpoint (checkpoints themselves not counted).
        self.since_checkpoint = 0

    def append(
        self,
        *,
        at: str,
        actor: str,
        action: str,
        task_id: str | None = None,
        args_digest: str | None = None,
        details: dict[str, str] | None = None,
    ) -> AuditRecord:
        """The next event record (validated: text only, a digest where a digest belongs)."""
        action = check_action(action)
        if action == CHECKPOINT:
            raise ValueError(f"{CHECKPOINT!r} records are written by the log itself")
        record = self._link(
            at=at,
            actor=clean_text(actor, 200),
            action=action,
            task_id=None if task_id is None else clean_text(task_id, 200),
            args_digest=check_digest(args_digest),
            details=clean_details(details),
        )
        self.since_checkpoint += 1
        return record

    def checkpoint(self, *, at: str) -> AuditRecord:
        """A signed checkpoint vouching for the current head (seq and hash)."""
        details = {"seq": str(self.seq), "head": self.head}
        record = self._link(at=at, actor=AUDIT_ACTOR, action=CHECKPOINT, details=details)
        signature = self._key.sign(checkpoint_message(record))
        signed = replace(record, sig=base64.b64encode(signature).decode("ascii"))
        signed = replace(signed, hash=signed.compute_hash())
        self.head = signed.hash
        self.since_checkpoint = 0
        return signed

    def _link(
        self,
        *,
        at: str,
        actor: str,
        action: str,
        details: dict[str, str],
        task_id: str | None = None,
        args_digest: str | None = None,
        sig: str | None = None,
    ) -> AuditRecord:
        record = AuditRecord.hashed(
            writer=self.writer,
            seq=self.seq + 1,
            prev=self.head,
            at=at,
            actor=actor,
            action=action,
            task_id=task_id,
            args_digest=args_digest,
            details=details,
            sig=sig,
        )
        self.seq, self.head = record.seq, record.hash
        return record
