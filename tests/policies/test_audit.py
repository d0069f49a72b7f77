"""The audit log's records, chains and verifier, without Redis: what is hashed, what is
signed, and that each kind of tampering is named at the first bad record."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import itertools
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.audit import (
    CHECKPOINT,
    GENESIS,
    Action,
    AuditRecord,
    Chain,
    Entry,
    FileSink,
    Flaw,
    file_name,
    load_private_key,
    load_public_key,
    parse_entry,
    public_key_pem,
    read_file,
    verify,
)
from policies.audit import args_digest as digest_of
from policies.audit.chain import checkpoint_message

#: One key pair for the module: generating one is cheap, but hypothesis runs many examples.
KEY = Ed25519PrivateKey.generate()
PUBLIC = KEY.public_key()
CANARY = "canary-4d1f-secret-argument"


# -- a small kit, shared with the other audit tests -------------------------------------------


def make_chain(
    n: int,
    *,
    writer: str = "host:1:aa",
    every: int | None = 10,
    seal: bool = True,
    key: Ed25519PrivateKey = KEY,
) -> list[AuditRecord]:
    """`n` event records of one writer, a checkpoint after every `every`, and a last one."""
    chain = Chain(writer, key)
    out = []
    for i in range(n):
        out.append(
            chain.append(
                at=f"2025-01-01T00:00:{i % 60:02d}.000000Z",
                actor="producer:demo",
                action=Action.MESSAGE_ACCEPTED,
                task_id=f"task-{i}",
                args_digest=digest_of(f"args {i}".encode()),
                details={"queue": "payments"},
            )
        )
        if every and chain.since_checkpoint >= every:
            out.append(chain.checkpoint(at="2025-01-01T00:01:00.000000Z"))
    if seal and chain.since_checkpoint:
        out.append(chain.checkpoint(at="2025-01-01T00:02:00.000000Z"))
    return out


def relink(records: Sequence[AuditRecord], start: int) -> list[AuditRecord]:
    """What someone who can write the log (not sign) does after an edit at `start`:
    re-hash that record and re-link every record after it."""
    out = list(records[:start])
    for record in records[start:]:
        prev = out[-1].hash if out else record.prev
        moved = dataclasses.replace(record, prev=prev)
        out.append(dataclasses.replace(moved, hash=moved.compute_hash()))
    return out


def write_jsonl(path: Path, records: Sequence[AuditRecord]) -> Path:
    path.write_text("".join(record.to_json() + "\n" for record in records), "utf-8")
    return path


def edit_line(path: Path, number: int, **fields: object) -> None:
    """Change fields of line `number` (1-based) in place, without re-hashing."""
    lines = path.read_text("utf-8").splitlines(keepends=True)
    data = json.loads(lines[number - 1])
    data.update(fields)
    lines[number - 1] = json.dumps(data) + "\n"
    path.write_text("".join(lines), "utf-8")


def keep_lines(path: Path, order: Sequence[int]) -> None:
    """Rewrite the file with its lines (1-based numbers) in `order`."""
    lines = path.read_text("utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[i - 1] for i in order), "utf-8")


# -- records ---------------------------------------------------------------------------------


class TestRecord:
    """A record hashes every field but its hash, canonically, and holds no argument."""

    def test_args_digest_is_the_sha256_hex_of_the_body(self) -> None:
        body = json.dumps([CANARY, 100]).encode()
        assert digest_of(body) == hashlib.sha256(body).hexdigest()

    def test_every_field_is_covered_by_the_hash(self) -> None:
        (record, *_) = make_chain(1, every=None, seal=False)
        assert record.hash == record.compute_hash()
        changes: dict[str, Any] = {
            "writer": "other:1:aa",
            "seq": 2,
            "prev": "1" * 64,
            "at": "2030-01-01T00:00:00.000000Z",
            "actor": "operator",
            "action": "key.revoked",
            "task_id": "other",
            "args_digest": "2" * 64,
            "details": {"queue": "inventory"},
            "sig": "AAAA",
            "v": 2,
        }
        assert set(changes) | {"hash"} == {f.name for f in dataclasses.fields(AuditRecord)}
        for name, value in changes.items():
            assert dataclasses.replace(record, **{name: value}).compute_hash() != record.hash, name

    def test_the_encoding_is_canonical_json(self) -> None:
        (record, *_) = make_chain(1, every=None, seal=False)
        line = record.to_json()
        assert line == json.dumps(
            json.loads(line), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
        assert AuditRecord.from_json(line) == record

    def test_an_argument_in_place_of_a_digest_is_refused(self) -> None:
        chain = Chain("host:1:aa", KEY)
        with pytest.raises(ValueError, match="sha256 hex digest"):
            chain.append(at="t", actor="a", action="message.accepted", args_digest=CANARY)
        assert chain.seq == 0, "a refused record takes no seq"

    def test_details_are_text_only_and_bounded(self) -> None:
        chain = Chain("host:1:aa", KEY)
        with pytest.raises(TypeError, match="text only"):
            chain.append(at="t", actor="a", action="key.used", details={"n": 1})  # type: ignore[dict-item]
        with pytest.raises(ValueError, match="at most"):
            chain.append(
                at="t", actor="a", action="key.used", details={str(i): "" for i in range(99)}
            )
        hostile = chain.append(
            at="t", actor="a\ud800", action="key.used", details={"r": "x" * 5000}
        )
        assert len(hostile.details["r"]) == 1024 and hostile.actor == "a?"
        hostile.to_json().encode("utf-8")  # writable: no lone surrogate left

    def test_checkpoints_are_the_logs_own(self) -> None:
        with pytest.raises(ValueError, match="written by the log itself"):
            Chain("host:1:aa", KEY).append(at="t", actor="a", action=CHECKPOINT)
        with pytest.raises(ValueError, match="dotted lower-case"):
            Chain("host:1:aa", KEY).append(at="t", actor="a", action="Not An Action")

    def test_parsing_is_strict(self) -> None:
        (record, *_) = make_chain(1, every=None, seal=False)
        data = json.loads(record.to_json())
        for bad in ({**data, "extra": "x"}, {k: v for k, v in data.items() if k != "actor"}):
            entry = parse_entry(json.dumps(bad), "f", 1)
            assert entry.record is None and "fields added" in entry.error
            assert (entry.writer, entry.seq) == ("host:1:aa", 1)
        entry = parse_entry(json.dumps({**data, "seq": True}), "f", 1)
        assert entry.record is None and "wrong type" in entry.error
        assert parse_entry(b"{torn", "f", 3) == Entry("f", 3, None, entry_error(b"{torn"))

    def test_file_names_are_safe(self) -> None:
        assert file_name("cli:host.example:123:ab") == "cli_host.example_123_ab.jsonl"
        assert file_name("../../etc/passwd") == ".._.._etc_passwd.jsonl"


def entry_error(raw: bytes) -> str:
    return parse_entry(raw, "f", 3).error


class TestChain:
    """Records link to the one before; a checkpoint signs the record itself and its claim."""

    def test_links_and_numbers(self) -> None:
        records = make_chain(25, every=10)
        assert [r.seq for r in records] == list(range(1, len(records) + 1))
        assert records[0].prev == GENESIS
        assert all(b.prev == a.hash for a, b in itertools.pairwise(records))
        checkpoints = [r for r in records if r.is_checkpoint]
        assert [r.seq for r in checkpoints] == [11, 22, 28]
        assert checkpoints[0].details == {"seq": "10", "head": records[9].hash}

    def test_the_signature_covers_the_whole_checkpoint(self) -> None:
        checkpoint = make_chain(3)[-1]
        assert checkpoint.sig is not None
        PUBLIC.verify(base64.b64decode(checkpoint.sig), checkpoint_message(checkpoint))
        moved = dataclasses.replace(checkpoint, at="2031-01-01T00:00:00.000000Z")
        assert checkpoint_message(moved) != checkpoint_message(checkpoint)

    def test_key_files_round_trip(self, tmp_path: Path) -> None:
        pem = write_bytes(tmp_path / "audit.pub", public_key_pem(KEY))
        raw = KEY.public_key().public_bytes_raw()
        b64 = write_bytes(tmp_path / "audit.b64", base64.b64encode(raw) + b"\n")
        for path in (pem, b64):
            assert load_public_key(path).public_bytes_raw() == raw
        secret = write_bytes(tmp_path / "audit.key", base64.b64encode(KEY.private_bytes_raw()))
        secret.chmod(0o644)
        with pytest.raises(ValueError, match="chmod 600"):
            load_private_key(secret)
        secret.chmod(0o600)
        assert load_private_key(secret).private_bytes_raw() == KEY.private_bytes_raw()
        with pytest.raises(ValueError, match="not an Ed25519 public key"):
            load_public_key(write_bytes(tmp_path / "junk", b"hello"))


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- verification of a file -------------------------------------------------------------------


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    """25 events with checkpoints at seq 11 and 22, sealed by one at 28, through the sink."""
    sink = FileSink(tmp_path, "host:1:aa")
    records = make_chain(25)
    sink.write(records[:12])
    sink.write(records[12:])
    sink.close()
    return sink.path


def problems_of(
    path: Path, **kwargs: object
) -> list[tuple[str, int | None, int | str | None, Flaw]]:
    report = verify(read_file(path), PUBLIC, **kwargs)  # type: ignore[arg-type]
    return [(p.writer, p.seq, p.position, p.flaw) for p in report.problems]


class TestVerifyFile:
    """Each kind of tampering of a JSON-lines file is named at its first bad record."""

    def test_a_clean_chain_verifies(self, log_file: Path) -> None:
        report = verify(read_file(log_file), PUBLIC)
        assert report.ok, report.problems
        assert (report.records, report.writers, report.checkpoints) == (28, 1, 3)
        assert report.summary() == "audit chain intact: 28 records, 1 writers, 3 checkpoints"
        (chain,) = report.chains
        assert (chain.first_seq, chain.last_seq, chain.signed_seq) == (1, 28, 27)

    def test_an_edited_field_names_that_record(self, log_file: Path) -> None:
        edit_line(log_file, 7, actor="operator")
        report = verify(read_file(log_file), PUBLIC)
        (problem,) = report.problems
        assert (problem.seq, problem.position, problem.flaw) == (7, 7, Flaw.EDITED)
        assert str(problem) == (
            f"{log_file} line 7: writer host:1:aa seq 7: edited: its hash does not match "
            "its content"
        )

    def test_a_deleted_line_names_the_gap(self, log_file: Path) -> None:
        keep_lines(log_file, [n for n in range(1, 29) if n != 5])
        (problem,) = verify(read_file(log_file), PUBLIC).problems
        assert (problem.seq, problem.position, problem.flaw) == (5, 5, Flaw.DELETED)
        assert "seq 5 missing (the next record here is seq 6)" in problem.reason

    def test_two_swapped_lines_are_reordered(self, log_file: Path) -> None:
        order = list(range(1, 29))
        order[3], order[4] = order[4], order[3]
        keep_lines(log_file, order)
        (problem,) = verify(read_file(log_file), PUBLIC).problems
        assert (problem.seq, problem.position, problem.flaw) == (5, 4, Flaw.REORDERED)
        assert problem.reason == "seq 5 comes before seq 4"

    def test_a_rewrite_re_hashed_up_to_a_checkpoint_breaks_its_signature(
        self, log_file: Path
    ) -> None:
        records = [e.record for e in read_file(log_file) if e.record is not None]
        forged = relink([*records[:5], dataclasses.replace(records[5], actor="x"), *records[6:]], 5)
        write_jsonl(log_file, forged)
        (problem,) = verify(read_file(log_file), PUBLIC).problems
        assert (problem.seq, problem.flaw) == (11, Flaw.BAD_SIGNATURE)

    def test_a_rewrite_re_hashed_without_re_linking_names_the_rewritten_record(
        self, log_file: Path
    ) -> None:
        records = [e.record for e in read_file(log_file) if e.record is not None]
        edited = dataclasses.replace(records[5], actor="x")
        records[5] = dataclasses.replace(edited, hash=edited.compute_hash())
        write_jsonl(log_file, records)
        (problem,) = verify(read_file(log_file), PUBLIC).problems
        assert (problem.seq, problem.position, problem.flaw) == (6, 6, Flaw.EDITED)

    def test_a_forged_checkpoint_signature_is_named(self, log_file: Path) -> None:
        records = [e.record for e in read_file(log_file) if e.record is not None]
        forger = Ed25519PrivateKey.generate()
        checkpoint = records[21]
        assert checkpoint.is_checkpoint
        fake = base64.b64encode(forger.sign(checkpoint_message(checkpoint))).decode()
        forged = relink(
            [*records[:21], dataclasses.replace(checkpoint, sig=fake), *records[22:]], 21
        )
        write_jsonl(log_file, forged)
        (problem,) = verify(read_file(log_file), PUBLIC).problems
        assert (problem.seq, problem.position, problem.flaw) == (22, 22, Flaw.BAD_SIGNATURE)

    def test_a_torn_line_is_named(self, log_file: Path) -> None:
        lines = log_file.read_text("utf-8").splitlines(keepends=True)
        lines[9] = lines[9][:40] + "\n"
        log_file.write_text("".join(lines), "utf-8")
        gap, torn = verify(read_file(log_file), PUBLIC).problems
        assert (torn.writer, torn.position, torn.flaw) == ("?", 10, Flaw.EDITED)
        assert torn.reason.startswith("does not parse")
        assert (gap.writer, gap.seq, gap.position, gap.flaw) == ("host:1:aa", 10, 11, Flaw.DELETED)

    def test_a_cut_after_a_checkpoint_shows_against_a_checkpoint_held_elsewhere(
        self, log_file: Path
    ) -> None:
        held_elsewhere = [e for e in read_file(log_file) if e.record and e.record.is_checkpoint]
        keep_lines(log_file, range(1, 16))
        (problem,) = verify(read_file(log_file), PUBLIC, heads=held_elsewhere).problems
        assert (problem.seq, problem.position, problem.flaw) == (16, 15, Flaw.TRUNCATED)
        assert "the chain ends at seq 15, but a signed checkpoint" in problem.reason
        assert "vouches for seq 28" in problem.reason

    def test_a_cut_after_the_last_checkpoint_of_a_lone_file_does_not_show(
        self, log_file: Path
    ) -> None:
        """The documented limit: with one copy only, what follows its last checkpoint
        can go unseen (the file cut to 15 lines still ends on an intact chain)."""
        keep_lines(log_file, range(1, 16))
        assert verify(read_file(log_file), PUBLIC).ok

    def test_a_chain_rewritten_from_a_cut_shows_against_a_checkpoint_held_elsewhere(
        self, log_file: Path
    ) -> None:
        """Cut and written again (re-hashed, new records): the held checkpoint of seq 11
        names another record than the one the file now has there."""
        held = [e for e in read_file(log_file) if e.record and e.record.is_checkpoint][:1]
        records = [e.record for e in read_file(log_file) if e.record is not None][:10]
        regrown = Chain("host:1:aa", Ed25519PrivateKey.generate())
        regrown.seq, regrown.head = 10, records[-1].hash
        records.append(regrown.append(at="t", actor="operator", action="key.created"))
        write_jsonl(log_file, records)
        (problem,) = verify(read_file(log_file), PUBLIC, heads=held).problems
        assert (problem.seq, problem.flaw) == (11, Flaw.TRUNCATED)

    def test_a_bad_checkpoint_held_elsewhere_is_named(self, log_file: Path) -> None:
        forger = Ed25519PrivateKey.generate()
        fake = make_chain(40, key=forger)[-1]
        report = verify(read_file(log_file), PUBLIC, heads=[fake])
        (problem,) = report.problems
        assert (problem.source, problem.flaw) == ("<heads>", Flaw.BAD_SIGNATURE)

    def test_a_repeated_batch_is_counted_not_blamed(self, log_file: Path) -> None:
        keep_lines(log_file, [*range(1, 13), *range(1, 29)])
        report = verify(read_file(log_file), PUBLIC)
        assert report.ok and report.repeats == 12 and report.records == 40


class TestVerifyStream:
    """Writers interleaved in one stream are walked apart; a trimmed start is allowed."""

    def test_interleaved_writers_verify_separately(self) -> None:
        chains = {w: make_chain(30, writer=w, every=7) for w in ("a:1:aa", "b:2:bb", "c:3:cc")}
        rng = random.Random(7)
        queues = {w: list(rs) for w, rs in chains.items()}
        mixed: list[AuditRecord] = []
        while any(queues.values()):
            writer = rng.choice([w for w, q in queues.items() if q])
            mixed.append(queues[writer].pop(0))
        report = verify(mixed, PUBLIC)
        assert report.ok and report.writers == 3 and report.records == 3 * 35
        del mixed[[i for i, r in enumerate(mixed) if r.writer == "b:2:bb"][9]]
        (problem,) = verify(mixed, PUBLIC).problems
        assert (problem.writer, problem.seq, problem.flaw) == ("b:2:bb", 10, Flaw.DELETED)

    def test_a_trimmed_start_is_allowed_only_when_said(self) -> None:
        records = make_chain(30)[12:]
        assert verify(records, PUBLIC, trimmed=True).ok
        (problem,) = verify(records, PUBLIC).problems
        assert (problem.seq, problem.flaw) == (1, Flaw.DELETED)
        forged_start = dataclasses.replace(records[0], prev=GENESIS)
        forged_start = dataclasses.replace(forged_start, seq=1, hash="")
        forged_start = dataclasses.replace(forged_start, hash=forged_start.compute_hash())
        (problem,) = verify([forged_start, *records[1:]], PUBLIC).problems
        assert problem.flaw == Flaw.DELETED


# -- any single tampering is seen ---------------------------------------------------------------

FIELDS = ["writer", "seq", "prev", "at", "actor", "action", "task_id", "args_digest", "details"]


def _changed(record: AuditRecord, name: str) -> AuditRecord:
    value = getattr(record, name)
    new: Any
    if name == "seq":
        new = value + 1
    elif name == "details":
        new = {**value, "queue": "elsewhere"}
    elif name in ("prev", "args_digest"):
        new = "f" * 64 if value != "f" * 64 else "e" * 64
    elif name == "action":
        new = "key.revoked" if value != "key.revoked" else "key.used"
    else:
        new = f"{value}x"
    return dataclasses.replace(record, **{name: new})


@st.composite
def tampered(draw: st.DrawFn) -> tuple[list[AuditRecord], list[AuditRecord], str]:
    """A sealed chain, the checkpoints a Redis hash would hold, and one tampering of it."""
    n = draw(st.integers(2, 40))
    every = draw(st.one_of(st.none(), st.integers(1, 12)))
    records = make_chain(n, every=every)
    heads = [records[-1]]
    i = draw(st.integers(0, len(records) - 1))
    how = draw(st.sampled_from(["edit", "rewrite", "delete", "swap"]))
    out = list(records)
    if how == "delete":
        del out[i]
    elif how == "swap":
        j = draw(st.integers(0, len(records) - 1).filter(lambda j: j != i))
        out[i], out[j] = out[j], out[i]
    else:
        # (re-linking would undo an edit of `prev`)
        fields = FIELDS if how == "edit" else [f for f in FIELDS if f != "prev"]
        edited = _changed(records[i], draw(st.sampled_from(fields)))
        out[i] = edited
        if how == "rewrite":  # re-hashed and re-linked by someone without the key
            out = relink(out, i)
    return out, heads, f"{how} at {i} of {len(records)}"


class TestAnyTampering:
    """Property: any single edit, re-hashed rewrite, deletion or swap in a random sealed
    chain is reported (given the chain's last checkpoint as held by Redis)."""

    @settings(max_examples=300, deadline=None)
    @given(tampered())
    def test_is_detected(self, case: tuple[list[AuditRecord], list[AuditRecord], str]) -> None:
        records, heads, what = case
        report = verify(records, PUBLIC, heads=heads)
        assert not report.ok, what

    @settings(max_examples=50, deadline=None)
    @given(st.integers(1, 40), st.one_of(st.none(), st.integers(1, 12)))
    def test_an_untouched_chain_passes(self, n: int, every: int | None) -> None:
        records = make_chain(n, every=every)
        assert verify(records, PUBLIC, heads=[records[-1]]).ok
