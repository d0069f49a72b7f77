"""The Procfile: the one list of Bulwark's processes (`bulwark up`, `bulwark proc`, and
the worker groups beat's fleet scaler sizes)."""

from __future__ import annotations

from pathlib import Path

from honcho.environ import parse_procfile

__all__ = ["ProcfileError", "read_procfile"]


class ProcfileError(RuntimeError):
    """The Procfile is missing, unreadable, or does not name the process asked for."""


def read_procfile(path: Path) -> dict[str, str]:
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        raise ProcfileError(
            f"no Procfile at {path}: run bulwark from the repository, or pass --procfile PATH"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProcfileError(f"cannot read the Procfile at {path}: {exc}") from None
    try:
        processes = dict(parse_procfile(text).processes)
    except Exception as exc:  # honcho's parser raises plain errors on bad lines
        raise ProcfileError(f"the Procfile at {path} does not parse: {exc}") from None
    if not processes:
        raise ProcfileError(f"the Procfile at {path} names no process")
    return processes
