"""`bulwark audit verify|tail`: is the audit log whole, and what has it recorded lately.

`verify` checks the JSON-lines files (`--file`, `--dir`) and/or the Redis
stream (`--redis`) with the audit PUBLIC key (`--public-key`, else
BULWARK_AUDIT_PUBLIC_KEY_FILE). Each source is also checked against the
signed checkpoints of the others (the Redis checkpoint hash, the other sink's
chain), which is what shows a file or stream cut short after a checkpoint.
A live writer's stream trails its file by up to one batch (and by its whole
backlog during a Redis outage); such a stream can show as truncated against
the file's checkpoints: verify again once the writer's sinks are written.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from policies.audit import (
    AUDIT_STREAM,
    AuditRecord,
    Entry,
    Problem,
    Report,
    load_public_key,
    read_file,
    read_heads,
    read_stream,
    read_tail,
    verify,
)
from workers.resources import policy_redis

PUBLIC_KEY_ENV = "BULWARK_AUDIT_PUBLIC_KEY_FILE"


class _Refused(Exception):
    """The command cannot run as asked (printed as `bulwark: ...`, exit code 2)."""


def _fail(message: str) -> int:
    print(f"bulwark: {message}", file=sys.stderr)
    return 2


def _public_key(path: str | None) -> Ed25519PublicKey:
    path = path or os.environ.get(PUBLIC_KEY_ENV)
    if not path:
        raise _Refused(f"no audit public key: give --public-key PATH or set {PUBLIC_KEY_ENV}")
    try:
        return load_public_key(path)
    except (OSError, ValueError) as exc:
        raise _Refused(f"audit public key: {exc}") from None


def _files(files: Sequence[str], directory: str | None) -> list[Path]:
    """The files to read, each checked to exist before anything is read."""
    paths = [Path(name) for name in files]
    for path in paths:
        if not path.is_file():
            raise _Refused(f"{path}: no such file")
    if directory is not None:
        if not Path(directory).is_dir():
            raise _Refused(f"{directory}: no such directory")
        paths.extend(sorted(Path(directory).glob("*.jsonl")))
    return paths


def _read(paths: Sequence[Path]) -> Iterator[Entry]:
    for path in paths:
        yield from read_file(path)


def _checkpoints(entries: Iterable[Entry], into: list[Entry]) -> Iterator[Entry]:
    """`entries`, passed through; the checkpoints among them also appended to `into`."""
    for entry in entries:
        if entry.record is not None and entry.record.is_checkpoint:
            into.append(entry)
        yield entry


def _verify_sources(
    key: Ed25519PublicKey, paths: Sequence[Path] | None, client: redis.Redis | None
) -> dict[str, Report]:
    """A report per source, each checked against the signed checkpoints of the others.

    Read in the order the sinks are written (the file first, then Redis): the
    files' checkpoints, the Redis checkpoint hash, the stream, then the files
    again. The stream is walked as it is read, not held in memory.
    """
    file_checkpoints = [
        entry
        for entry in _read(paths or ())
        if entry.record is not None and entry.record.is_checkpoint
    ]
    reports = {}
    stream_checkpoints: list[Entry] = []
    if client is not None:
        heads = read_heads(client)
        stream = _checkpoints(read_stream(client), stream_checkpoints)
        reports["redis"] = verify(stream, key, heads=[*heads, *file_checkpoints], trimmed=True)
        stream_checkpoints.extend(heads)
    if paths is not None:
        reports["files"] = verify(_read(paths), key, heads=stream_checkpoints)
    return dict(sorted(reports.items()))


def _cmd_verify(args: argparse.Namespace) -> int:
    try:
        if not (args.file or args.dir or args.redis):
            raise _Refused("audit verify: give --file PATH, --dir DIR or --redis")
        key = _public_key(args.public_key)
        paths = _files(args.file or (), args.dir) if args.file or args.dir else None
        reports = _verify_sources(key, paths, policy_redis() if args.redis else None)
    except _Refused as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(str(exc))
    except redis.RedisError as exc:
        return _fail(f"Redis error: {type(exc).__name__}: {exc}")
    problems: dict[str, Problem] = {}
    for report in reports.values():
        for problem in report.problems:
            problems.setdefault(str(problem), problem)
    if problems:
        for line in problems:
            print(line)
        return 1
    for source, report in reports.items():
        print(report.summary() + (f" ({source})" if len(reports) > 1 else ""))
    return 0


# -- tail ----------------------------------------------------------------------------------------


def describe(record: AuditRecord) -> str:
    """One record as one readable line."""
    if record.is_checkpoint:
        outcome = f"signs seq {record.details.get('seq', '?')}"
    else:
        outcome = record.details.get("outcome") or record.details.get("reason") or ""
        rest = {k: v for k, v in record.details.items() if k not in ("outcome", "reason")}
        if rest:
            outcome = " ".join([outcome, *(f"{k}={v}" for k, v in sorted(rest.items()))]).strip()
    return (
        f"{record.at}  {record.writer}  #{record.seq}  {record.actor}  {record.action}  "
        f"task={record.task_id or '-'}  {outcome}"
    ).rstrip()


def _show(entries: Iterable[Entry], as_json: bool) -> None:
    for entry in entries:
        record = entry.record
        if as_json:
            data: dict[str, Any] = (
                json.loads(record.to_json())
                if record is not None
                else {"unreadable": entry.error, "writer": entry.writer, "seq": entry.seq}
            )
            print(json.dumps({"id": entry.position, **data}, ensure_ascii=False), flush=True)
        elif record is None:
            print(f"{entry.position}  <unreadable entry: {entry.error}>", flush=True)
        else:
            print(describe(record), flush=True)


def _cmd_tail(args: argparse.Namespace) -> int:
    client = policy_redis()
    stop = threading.Event()
    if args.follow:  # Ctrl-C (or SIGTERM) ends the loop between reads, never inside one
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    try:
        entries, last = read_tail(client, args.n)
        _show(entries, args.json)
        last = last or "0-0"
        while args.follow and not stop.is_set():
            replies: Any = client.xread({AUDIT_STREAM: last}, count=500, block=500)
            for _stream, rows in replies or ():
                entries, newest = read_tail(client, len(rows), after=last)
                _show(entries, args.json)
                last = newest or last
    except redis.RedisError as exc:
        return _fail(f"Redis error: {type(exc).__name__}: {exc}")
    except KeyboardInterrupt:
        return 0
    return 0


def _positive(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{raw!r}: expected a positive number")
    return value


def register(sub: Any) -> None:
    """Add `bulwark audit verify|tail` to the command's subparsers."""
    p = sub.add_parser("audit", help="verify or read the tamper-evident audit log")
    asub = p.add_subparsers(dest="action", required=True)
    a = asub.add_parser("verify", help="check every writer's chain; name the first bad record")
    a.add_argument("--file", action="append", metavar="PATH", help="a JSON-lines file (repeat)")
    a.add_argument("--dir", metavar="DIR", help="every *.jsonl file of a folder")
    a.add_argument("--redis", action="store_true", help="the Redis stream " + AUDIT_STREAM)
    a.add_argument(
        "--public-key",
        metavar="PATH",
        help=f"the audit public key (PEM or base64 raw); default ${PUBLIC_KEY_ENV}",
    )
    a.set_defaults(func=_cmd_verify)
    a = asub.add_parser("tail", help="the newest records of the Redis stream, readably")
    a.add_argument("-n", type=_positive, default=20, metavar="N", help="how many (default 20)")
    a.add_argument("--follow", "-f", action="store_true", help="then show new ones as they come")
    a.add_argument("--json", action="store_true", help="one JSON object per line")
    a.set_defaults(func=_cmd_tail)
