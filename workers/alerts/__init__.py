"""Alerting: fingerprinted, deduplicated alerts dispatched to sinks. (issue 4: in progress)"""

from __future__ import annotations

import argparse


def register_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `bulwark alerts ...` (filled in by the alerting work)."""
