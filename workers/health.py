"""Health checks: a registry of checks, results in Redis, `bulwark health`."""

from __future__ import annotations

import argparse


def register_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `bulwark health` (filled in by the health work)."""
