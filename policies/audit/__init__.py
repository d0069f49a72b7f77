"""The tamper-evident audit log: who did what, when, to which task, as hash chains.

One record per security-relevant event (a message accepted, rejected or run;
a key used, created, rotated or revoked; every operator action). A record
keeps a digest of the task's arguments (`args_digest(body)`), never the
arguments or a secret.

One chain per writer
    Each process writes its own chain (writer id `[role:]host:pid:nonce`):
    every record carries the writer id, its sequence number in that chain and
    the hash of the chain's previous record. A single global chain would need
    the previous record's hash before writing the next, which serializes the
    whole fleet through one lock (one more Redis round trip per record, held
    across processes). Per-writer chains need no coordination; verification
    walks each writer's chain separately, even when they are interleaved in one
    stream.

Signed checkpoints
    Hashes have no key, so someone who can write the log could rewrite a record
    and re-hash everything after it. Every `checkpoint_every` records (100) or
    `checkpoint_interval` seconds (10), and when the log stops, the writer adds
    a checkpoint record signed with the Ed25519 audit key, vouching for
    (writer, seq, head hash). Verifying needs only the public key.

Two sinks, append-only
    Records are buffered and written in batches: a Redis stream
    (`bulwark:audit`, `MAXLEN ~`) plus a hash of each writer's latest checkpoint
    (`bulwark:audit:checkpoints`), and one JSON-lines file per writer. A failing
    sink never raises into the caller; its records wait (bounded).

What verification detects, and what it cannot
    - An edited record (its hash no longer matches), a deleted one (a gap in the
      sequence), two swapped (the sequence steps back), a forged checkpoint (the
      signature fails), and a rewrite re-hashed and re-linked up to a
      checkpoint (the checkpoint's signature covers the hash it links to).
    - Truncation: a checkpoint held elsewhere (the Redis checkpoint hash, or the
      other sink's copy of the chain) that names a seq beyond a chain's end, or a
      hash the chain does not have.
    - NOT detectable: the loss of records after a writer's last checkpoint when
      only one copy is available (a file cut after its last checkpoint, with no
      stream or checkpoint hash to compare; likewise the newest stream entries,
      if the checkpoint hash was rolled back to an older, validly signed one);
      the removal of a writer's whole file or all its stream entries (a folder
      holds no list of writers); the oldest entries of the stream, which it
      trims by design; and anything done by whoever holds the private key.
"""

from __future__ import annotations

from policies.audit.chain import Chain
from policies.audit.files import FileSink, file_name, read_dir, read_file
from policies.audit.log import AuditConfig, AuditLog, QueuedFlush, writer_id
from policies.audit.record import (
    CHECKPOINT,
    GENESIS,
    Action,
    AuditRecord,
    Entry,
    args_digest,
    parse_entry,
)
from policies.audit.stream import (
    AUDIT_CHECKPOINTS,
    AUDIT_STREAM,
    DEFAULT_MAXLEN,
    StreamSink,
    read_heads,
    read_stream,
    read_tail,
)
from policies.audit.verify import ChainSummary, Flaw, Problem, Report, verify
from policies.keyfile import load_private_key, load_public_key, public_key_pem

__all__ = [
    "AUDIT_CHECKPOINTS",
    "AUDIT_STREAM",
    "CHECKPOINT",
    "DEFAULT_MAXLEN",
    "GENESIS",
    "Action",
    "AuditConfig",
    "AuditLog",
    "AuditRecord",
    "Chain",
    "ChainSummary",
    "Entry",
    "FileSink",
    "Flaw",
    "Problem",
    "QueuedFlush",
    "Report",
    "StreamSink",
    "args_digest",
    "file_name",
    "load_private_key",
    "load_public_key",
    "parse_entry",
    "public_key_pem",
    "read_dir",
    "read_file",
    "read_heads",
    "read_stream",
    "read_tail",
    "verify",
    "writer_id",
]
