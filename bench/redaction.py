"""Redaction of hostile text: milliseconds per megabyte, and the characters read per
character scanned (the work bound `tests/workers/telemetry/test_redact.py` asserts).

    .venv/bin/python bench/redaction.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.workers.telemetry.test_redact import HOSTILE
from workers.telemetry.redact import MAX_SCAN, _Scan, redact

MEGABYTE = 1_000_000


def main() -> None:
    print(f"redact() of 1 MB of hostile text (scans and keeps the first {MAX_SCAN} characters)")
    print(f"   {'text':30} {'ms / MB':>8} {'reads / char':>13}")
    for name, text in sorted(HOSTILE.items()):
        big = (text * (MEGABYTE // len(text) + 1))[:MEGABYTE]
        best = min(_timed(big) for _ in range(5))
        scan = _Scan(big[:MAX_SCAN])
        scan.run()
        print(f"   {name:30} {best * 1000:8.1f} {scan.reads / MAX_SCAN:13.2f}")


def _timed(text: str) -> float:
    started = time.perf_counter()
    redact(text)
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
