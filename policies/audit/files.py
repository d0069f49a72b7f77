"""The JSON-lines sink: one append-only file per writer, and reading it back.

One file per writer means no two processes ever append to the same file, so
no lock is needed and a line is never interleaved with another process's.
A batch is written with one `write` and flushed; if the write fails halfway
the file is cut back to where the batch began, so a retry does not leave a
torn line behind.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

from policies.audit.record import AuditRecord, Entry, parse_entry

__all__ = ["FileSink", "file_name", "read_dir", "read_file"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.@-]")


def file_name(writer: str) -> str:
    """`host:123:ab` -> `host_123_ab.jsonl` (anything but A-Z a-z 0-9 _ . @ - becomes `_`)."""
    return _UNSAFE.sub("_", writer) + ".jsonl"


class FileSink:
    """Appends one writer's records to `<directory>/<writer>.jsonl` (opened on first write)."""

    def __init__(self, directory: Path | str, writer: str) -> None:
        self.path = Path(directory) / file_name(writer)
        self.name = f"file:{self.path}"
        self._file: TextIO | None = None

    def write(self, records: Sequence[AuditRecord]) -> None:
        """Append `records` and flush; raises OSError (the file is then as before the call)."""
        text = "".join(record.to_json() + "\n" for record in records)
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        start = self._file.tell()
        try:
            self._file.write(text)
            self._file.flush()
        except OSError:
            self._undo(start)
            raise

    def _undo(self, start: int) -> None:
        file, self._file = self._file, None
        if file is None:
            return
        with contextlib.suppress(OSError, ValueError):  # else the verifier names the torn line
            file.truncate(start)
        with contextlib.suppress(OSError):
            file.close()

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()


def read_file(path: Path | str) -> Iterator[Entry]:
    """Every record of one file, with its line number (blank lines skipped)."""
    path = Path(path)
    with path.open("rb") as file:
        for number, line in enumerate(file, start=1):
            if line.strip():
                yield parse_entry(line, str(path), number)


def read_dir(directory: Path | str) -> Iterator[Entry]:
    """Every record of every `*.jsonl` file in `directory`, file by file."""
    for path in sorted(Path(directory).glob("*.jsonl")):
        yield from read_file(path)
