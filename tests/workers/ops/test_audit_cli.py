"""`bulwark audit verify|tail`, through a parser of the test's own that `register`s the
command: exit codes, the first bad record named, and the stream shown readably."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from policies.audit import (
    AUDIT_STREAM,
    Action,
    AuditConfig,
    AuditLog,
    args_digest,
    file_name,
    public_key_pem,
)
from tests.kit import ROOT, child_env, poll
from tests.policies.test_audit import KEY, edit_line, keep_lines
from workers.ops import audit

WRITER = "host:7:ab"


def bulwark(*argv: str) -> tuple[int, str, str]:
    """Run `bulwark <argv>` with only the audit command registered: (code, stdout, stderr)."""
    parser = argparse.ArgumentParser(prog="bulwark")
    audit.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = int(args.func(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def public_key(tmp_path: Path) -> str:
    path = tmp_path / "audit.pub"
    path.write_bytes(public_key_pem(KEY))
    return str(path)


def write_log(
    directory: Path, client: redis.Redis | None = None, n: int = 25, writer: str = WRITER
) -> Path:
    """`n` records of every kind the fleet writes, a checkpoint every 10; stopped (sealed)."""
    log = AuditLog(
        writer=writer,
        signing_key=KEY,
        client=client,
        directory=directory,
        config=AuditConfig(checkpoint_every=10),
    )
    for i in range(n):
        log.record(
            Action.MESSAGE_EXECUTED,
            actor="worker:host:7",
            task_id=f"task-{i}",
            args_digest=args_digest(b"[1]"),
            details={"outcome": "success"},
        )
    assert log.stop()
    return directory / file_name(writer)


def stream_ids(r: redis.Redis) -> list[bytes]:
    rows: Any = r.xrange(AUDIT_STREAM)
    return [entry_id for entry_id, _ in rows]


class TestVerifyFiles:
    """Exit 0 and the summary for an intact log; exit 1 and the first bad record if not."""

    def test_an_intact_folder(self, tmp_path: Path, public_key: str) -> None:
        write_log(tmp_path / "audit")
        write_log(tmp_path / "audit", writer="other:8:cd", n=3)
        code, out, _ = bulwark("audit", "verify", "--dir", str(tmp_path / "audit"),
                               "--public-key", public_key)  # fmt: skip
        assert (code, out) == (0, "audit chain intact: 32 records, 2 writers, 4 checkpoints\n")

    def test_an_edited_record_is_named(self, tmp_path: Path, public_key: str) -> None:
        path = write_log(tmp_path)
        edit_line(path, 7, task_id="someone-elses")
        code, out, _ = bulwark("audit", "verify", "--file", str(path), "--public-key", public_key)
        assert code == 1
        assert out == (
            f"{path} line 7: writer {WRITER} seq 7: edited: its hash does not match its content\n"
        )

    def test_a_deleted_record_is_named(self, tmp_path: Path, public_key: str) -> None:
        path = write_log(tmp_path)
        keep_lines(path, [n for n in range(1, 29) if n != 12])
        code, out, _ = bulwark("audit", "verify", "--file", str(path), "--public-key", public_key)
        assert code == 1
        assert out.startswith(f"{path} line 12: writer {WRITER} seq 12: deleted: seq 12 missing")

    def test_the_key_from_the_environment(
        self, tmp_path: Path, public_key: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("BULWARK_AUDIT_PUBLIC_KEY_FILE", raising=False)
        path = write_log(tmp_path)
        code, _, err = bulwark("audit", "verify", "--file", str(path))
        assert code == 2 and "no audit public key" in err and "BULWARK_AUDIT_PUBLIC_KEY_FILE" in err
        monkeypatch.setenv("BULWARK_AUDIT_PUBLIC_KEY_FILE", public_key)
        assert bulwark("audit", "verify", "--file", str(path))[0] == 0

    def test_another_key_names_the_first_checkpoint(self, tmp_path: Path) -> None:
        path = write_log(tmp_path)
        other = tmp_path / "other.pub"
        other.write_bytes(public_key_pem(Ed25519PrivateKey.generate()))
        code, out, _ = bulwark("audit", "verify", "--file", str(path), "--public-key", str(other))
        assert code == 1
        assert f"line 11: writer {WRITER} seq 11: bad checkpoint signature" in out

    def test_refusals(self, tmp_path: Path, public_key: str) -> None:
        code, _, err = bulwark("audit", "verify", "--public-key", public_key)
        assert code == 2 and "give --file PATH, --dir DIR or --redis" in err
        code, _, err = bulwark("audit", "verify", "--file", str(tmp_path / "nope.jsonl"),
                               "--public-key", public_key)  # fmt: skip
        assert code == 2 and "nope.jsonl" in err
        code, _, err = bulwark("audit", "verify", "--dir", str(tmp_path),
                               "--public-key", str(tmp_path / "missing.pub"))  # fmt: skip
        assert code == 2 and "audit public key" in err


@pytest.mark.integration
class TestVerifyRedis:
    """The stream verified on its own and against the files; a cut shows on either side."""

    def test_both_sources_intact(self, r: redis.Redis, tmp_path: Path, public_key: str) -> None:
        write_log(tmp_path, r)
        code, out, _ = bulwark("audit", "verify", "--dir", str(tmp_path), "--redis",
                               "--public-key", public_key)  # fmt: skip
        assert code == 0
        assert out.splitlines() == [
            "audit chain intact: 28 records, 1 writers, 3 checkpoints (files)",
            "audit chain intact: 28 records, 1 writers, 3 checkpoints (redis)",
        ]

    def test_a_file_cut_after_a_checkpoint_shows_against_redis(
        self, r: redis.Redis, tmp_path: Path, public_key: str
    ) -> None:
        path = write_log(tmp_path, r)
        keep_lines(path, range(1, 20))
        code, out, _ = bulwark("audit", "verify", "--dir", str(tmp_path), "--redis",
                               "--public-key", public_key)  # fmt: skip
        assert code == 1
        (line,) = out.splitlines()
        assert line.startswith(f"{path} line 19: writer {WRITER} seq 20: truncated: ")
        assert "the chain ends at seq 19, but a signed checkpoint" in line

    def test_a_record_deleted_from_the_stream_is_named_by_entry_id(
        self, r: redis.Redis, tmp_path: Path, public_key: str
    ) -> None:
        write_log(tmp_path, r)
        ids = stream_ids(r)
        r.xdel(AUDIT_STREAM, ids[4])
        code, out, _ = bulwark("audit", "verify", "--redis", "--public-key", public_key)
        assert code == 1
        assert out == (
            f"redis:{AUDIT_STREAM} entry {ids[5].decode()}: writer {WRITER} seq 5: deleted: "
            "seq 5 missing (the next record here is seq 6)\n"
        )

    def test_the_streams_tail_cut_shows_against_the_checkpoint_hash(
        self, r: redis.Redis, tmp_path: Path, public_key: str
    ) -> None:
        write_log(tmp_path, r)
        ids = stream_ids(r)
        r.xdel(AUDIT_STREAM, *ids[-3:])
        code, out, _ = bulwark("audit", "verify", "--redis", "--public-key", public_key)
        assert code == 1
        assert f"writer {WRITER} seq 26: truncated: the chain ends at seq 25" in out


@pytest.mark.integration
class TestTail:
    """The newest records, one readable line each (or JSON); --follow shows new ones."""

    def test_tail_shows_the_newest(self, r: redis.Redis, tmp_path: Path) -> None:
        write_log(tmp_path, r, n=5)
        code, out, _ = bulwark("audit", "tail", "-n", "3")
        assert code == 0
        lines = out.splitlines()
        assert len(lines) == 3
        at, writer, seq, actor, action, task, outcome = lines[0].split("  ")
        assert at.endswith("Z") and at[:2] == "20"
        assert (writer, seq, actor, action) == (WRITER, "#4", "worker:host:7", "message.executed")
        assert (task, outcome) == ("task=task-3", "success")
        assert lines[-1].endswith("audit.checkpoint  task=-  signs seq 5")

    def test_tail_as_json(self, r: redis.Redis, tmp_path: Path) -> None:
        write_log(tmp_path, r, n=2)
        code, out, _ = bulwark("audit", "tail", "--json")
        rows = [json.loads(line) for line in out.splitlines()]
        assert code == 0 and [row["seq"] for row in rows] == [1, 2, 3]
        assert rows[0]["details"] == {"outcome": "success"} and "-" in rows[0]["id"]

    def test_follow(self, r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
        write_log(tmp_path / "a", r, n=1)
        script = (
            "import argparse, sys\n"
            "from workers.ops import audit\n"
            "p = argparse.ArgumentParser()\n"
            "audit.register(p.add_subparsers(dest='command'))\n"
            "a = p.parse_args(sys.argv[1:])\n"
            "sys.exit(a.func(a))\n"
        )
        process = subprocess.Popen(
            [sys.executable, "-c", script, "audit", "tail", "--follow", "-n", "1"],
            cwd=ROOT, env=child_env(redis_url), stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        lines = read_lines(process)
        try:
            poll(lambda: any("signs seq 1" in line for line in lines), what="the last record")
            write_log(tmp_path / "b", r, n=2, writer="late:9:ef")
            poll(lambda: sum("late:9:ef" in line for line in lines) == 3, what="new records")
        finally:
            process.send_signal(signal.SIGINT)
            assert process.wait(10) == 0
        assert len(lines) == 4, lines


def read_lines(process: subprocess.Popen[str]) -> list[str]:
    """The process's stdout lines, as they come (read by a thread)."""
    lines: list[str] = []

    def read(stream: Iterator[str]) -> None:
        for line in stream:
            lines.append(line)

    assert process.stdout is not None
    threading.Thread(target=read, args=(process.stdout,), daemon=True).start()
    return lines
