"""Walking stored records: is each writer's chain whole, in order, unedited and signed?

`verify` reads records in the order they were stored (file lines, stream
entries), groups them by writer and walks each chain on its own. For each
writer it names the FIRST bad record and why, and stops looking at that
writer (what follows a break cannot be trusted or blamed):

- edited: a record's hash is not that of its content, a record does not
  parse, or a record was re-hashed after an edit (the next one links to
  another hash; the re-hashed one is named). Re-linking everything after the
  edit too breaks the signature of the next checkpoint (it covers the hash
  it links to);
- deleted: a sequence number is missing and never turns up later;
- reordered: a sequence number comes after a larger one;
- truncated: a signed checkpoint given as `heads` (read from elsewhere)
  vouches for a seq beyond the chain's end, or for a hash the chain does not
  have at that seq;
- bad checkpoint signature: a checkpoint the audit public key did not sign.

An exact repeat of a record already seen (same writer, seq and hash) is
counted, not blamed: a batch sent again after a lost reply repeats itself.

`trimmed=True` is for the Redis stream, which drops its oldest entries: a
writer's records may begin past seq 1, and checkpoints older than what is left
cannot be checked.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from policies.audit.chain import checkpoint_claim, signature_ok
from policies.audit.record import GENESIS, AuditRecord, Entry

__all__ = ["ChainSummary", "Flaw", "Problem", "Report", "verify"]

#: How many recent (seq, hash) pairs of each writer are kept to recognise a repeated batch.
REPEAT_WINDOW = 100_000


class Flaw(StrEnum):
    EDITED = "edited"
    DELETED = "deleted"
    REORDERED = "reordered"
    TRUNCATED = "truncated"
    BAD_SIGNATURE = "bad checkpoint signature"


@dataclass(frozen=True, slots=True)
class Problem:
    """The first bad record of one writer: where it is stored and what is wrong."""

    writer: str
    seq: int | None
    flaw: Flaw
    reason: str
    source: str
    #: A file's line number, a stream entry id, a writer (for the checkpoint hash).
    position: int | str | None

    @property
    def where(self) -> str:
        if self.position is None:
            return self.source
        kind = "line" if isinstance(self.position, int) else "entry"
        return f"{self.source} {kind} {self.position}"

    def __str__(self) -> str:
        seq = "?" if self.seq is None else self.seq
        return f"{self.where}: writer {self.writer} seq {seq}: {self.flaw}: {self.reason}"


@dataclass(frozen=True, slots=True)
class ChainSummary:
    """One writer's chain as read: its range, and how far checkpoints vouch for it."""

    writer: str
    first_seq: int | None
    last_seq: int | None
    records: int
    checkpoints: int
    #: The highest seq a valid checkpoint vouches for (0: none). Records past it are
    #: linked but unsigned: their loss from the end would not show.
    signed_seq: int


@dataclass(frozen=True, slots=True)
class Report:
    problems: tuple[Problem, ...]
    records: int
    checkpoints: int
    repeats: int
    chains: tuple[ChainSummary, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def writers(self) -> int:
        return len(self.chains)

    def summary(self) -> str:
        return (
            f"audit chain intact: {self.records} records, {self.writers} writers, "
            f"{self.checkpoints} checkpoints"
        )


@dataclass(slots=True)
class _Walk:
    """The state of one writer's walk."""

    writer: str
    trimmed: bool
    heads: dict[int, tuple[str, str]] = field(default_factory=dict)
    last: AuditRecord | None = None
    last_entry: Entry | None = None
    first_seq: int | None = None
    records: int = 0
    checkpoints: int = 0
    signed_seq: int = 0
    problem: Problem | None = None
    #: A missing seq, blamed as deleted at the end unless a later record steps back.
    gap: Problem | None = None
    gap_after: int = 0
    recent: dict[int, str] = field(default_factory=dict)

    def blame(self, entry: Entry, seq: int | None, flaw: Flaw, reason: str) -> None:
        self.problem = Problem(self.writer, seq, flaw, reason, entry.source, entry.position)

    def step(self, entry: Entry, public_key: Ed25519PublicKey) -> None:
        record = entry.record
        assert record is not None
        if self.problem is not None:
            return
        if self.gap is not None:
            if record.seq < self.gap_after:
                gap = self.gap
                self.problem = Problem(
                    self.writer,
                    self.gap_after,
                    Flaw.REORDERED,
                    f"seq {self.gap_after} comes before seq {record.seq}",
                    gap.source,
                    gap.position,
                )
            return
        if record.hash != record.compute_hash():
            self.blame(entry, record.seq, Flaw.EDITED, "its hash does not match its content")
            return
        last = self.last
        if last is not None and record.seq <= last.seq:
            if self.recent.get(record.seq) == record.hash:
                return  # a repeated batch
            self.blame(entry, record.seq, Flaw.REORDERED, f"seq {record.seq} after seq {last.seq}")
            return
        expected = last.seq + 1 if last is not None else (record.seq if self.trimmed else 1)
        if record.seq > expected:
            missing = f"seq {expected}" + (
                f"..{record.seq - 1}" if record.seq - 1 > expected else ""
            )
            self.gap = Problem(
                self.writer,
                expected,
                Flaw.DELETED,
                f"{missing} missing (the next record here is seq {record.seq})",
                entry.source,
                entry.position,
            )
            self.gap_after = record.seq
            return
        if last is not None and record.prev != last.hash:
            assert self.last_entry is not None
            self.blame(
                self.last_entry,
                last.seq,
                Flaw.EDITED,
                f"seq {record.seq} links to another hash: this record (or the link) "
                "was rewritten and re-hashed",
            )
            return
        if last is None and not self.trimmed and record.prev != GENESIS:
            self.blame(entry, record.seq, Flaw.EDITED, "the first record does not start a chain")
            return
        if record.is_checkpoint and not self._checkpoint(entry, record, public_key):
            return
        head = self.heads.get(record.seq)
        if head is not None and head[0] != record.hash:
            self.blame(
                entry,
                record.seq,
                Flaw.TRUNCATED,
                f"a signed checkpoint ({head[1]}) vouches for another record at this seq",
            )
            return
        self._accept(entry, record)

    def _checkpoint(self, entry: Entry, record: AuditRecord, public_key: Ed25519PublicKey) -> bool:
        if not signature_ok(record, public_key):
            self.blame(
                entry,
                record.seq,
                Flaw.BAD_SIGNATURE,
                "not signed by the audit key (forged, or re-linked after an edit before it)",
            )
            return False
        claim = checkpoint_claim(record)
        if claim != (record.seq - 1, record.prev):
            self.blame(entry, record.seq, Flaw.EDITED, "the checkpoint names another record")
            return False
        self.signed_seq = max(self.signed_seq, claim[0])
        return True

    def _accept(self, entry: Entry, record: AuditRecord) -> None:
        self.last, self.last_entry = record, entry
        if self.first_seq is None:
            self.first_seq = record.seq
        if record.seq in self.heads:
            self.signed_seq = max(self.signed_seq, record.seq)
        self.recent[record.seq] = record.hash
        if len(self.recent) > REPEAT_WINDOW:
            del self.recent[next(iter(self.recent))]

    def finish(self) -> None:
        if self.problem is None and self.gap is not None:
            self.problem = self.gap
        if self.problem is not None or self.last is None or self.last_entry is None:
            return
        beyond = [seq for seq in self.heads if seq > self.last.seq]
        if beyond:
            seq = max(beyond)
            self.problem = Problem(
                self.writer,
                self.last.seq + 1,
                Flaw.TRUNCATED,
                f"the chain ends at seq {self.last.seq}, but a signed checkpoint "
                f"({self.heads[seq][1]}) vouches for seq {seq}",
                self.last_entry.source,
                self.last_entry.position,
            )

    def summary(self) -> ChainSummary:
        return ChainSummary(
            self.writer,
            self.first_seq,
            None if self.last is None else self.last.seq,
            self.records,
            self.checkpoints,
            self.signed_seq,
        )


def _entries(items: Iterable[Entry | AuditRecord], source: str) -> Iterable[Entry]:
    for position, item in enumerate(items, start=1):
        if isinstance(item, Entry):
            yield item
        else:
            yield Entry(source, position, item, "", item.writer, item.seq)


def _heads(
    heads: Iterable[Entry | AuditRecord], public_key: Ed25519PublicKey
) -> tuple[dict[str, dict[int, tuple[str, str]]], list[Problem]]:
    """Checkpoints from elsewhere, by writer: {seq: (head hash, where it was read)}."""
    found: dict[str, dict[int, tuple[str, str]]] = {}
    problems = []
    for entry in _entries(heads, "<heads>"):
        record, writer = entry.record, entry.writer or "?"

        def blame(flaw: Flaw, reason: str, entry: Entry = entry, writer: str = writer) -> None:
            problems.append(Problem(writer, entry.seq, flaw, reason, entry.source, entry.position))

        if record is None:
            blame(Flaw.EDITED, f"the checkpoint does not parse: {entry.error}")
        elif record.hash != record.compute_hash() or not record.is_checkpoint:
            blame(Flaw.EDITED, "not an intact checkpoint record")
        elif not signature_ok(record, public_key):
            blame(Flaw.BAD_SIGNATURE, "the checkpoint is not signed by the audit key")
        else:
            claim = checkpoint_claim(record)
            assert claim is not None
            # The checkpoint record itself (seq + 1) is vouched for by its own hash.
            by_seq = found.setdefault(record.writer, {})
            by_seq.setdefault(claim[0], (claim[1], entry.source))
            by_seq.setdefault(record.seq, (record.hash, entry.source))
    return found, problems


def verify(
    records: Iterable[Entry | AuditRecord],
    public_key: Ed25519PublicKey,
    *,
    heads: Iterable[Entry | AuditRecord] = (),
    trimmed: bool = False,
) -> Report:
    """Walk every writer's chain in `records`; name the first bad record of each.

    `heads` are signed checkpoints read from elsewhere (the Redis checkpoint
    hash, the other sink): each writer's chain must hold the seq and hash they
    vouch for. Heads of writers that have no records here are not checked (a
    folder may hold one host's files only).
    """
    known, problems = _heads(heads, public_key)
    walks: dict[str, _Walk] = {}
    records_seen = repeats = 0
    for entry in _entries(records, "<records>"):
        records_seen += 1
        record = entry.record
        # What does not say whose it is is grouped by where it was read, shown as "?".
        group = entry.writer if entry.writer is not None else f"\0{entry.source}"
        walk = walks.get(group)
        if walk is None:
            writer = entry.writer if entry.writer is not None else "?"
            walk = walks[group] = _Walk(writer, trimmed, heads=known.get(writer, {}))
        walk.records += 1
        if record is None:
            if walk.problem is None and walk.gap is None:
                walk.blame(entry, entry.seq, Flaw.EDITED, f"does not parse: {entry.error}")
            continue
        walk.checkpoints += record.is_checkpoint
        before = walk.last
        walk.step(entry, public_key)
        if walk.last is before and walk.problem is None and walk.gap is None:
            repeats += 1
    for walk in walks.values():
        walk.finish()
    problems.extend(walk.problem for walk in walks.values() if walk.problem is not None)
    return Report(
        problems=tuple(problems),
        records=records_seen,
        checkpoints=sum(walk.checkpoints for walk in walks.values()),
        repeats=repeats,
        chains=tuple(walk.summary() for walk in walks.values()),
    )
