"""Flower on the Bulwark app, logging as every other process does (`python -m workers.ops.flower`).

Flower hands its logging to tornado, which prints its own plain-text format.
This entry point configures Bulwark's logging first (JSON lines with secrets
masked, or plain text with `BULWARK_LOG_JSON=false`), then runs `celery flower`
with tornado's own logging off and Celery's banner quiet. Arguments are passed
on to Flower.

Flower never runs without basic auth: its credentials come from
`FLOWER_BASIC_AUTH` (`user:password[,user:password]`, as `bulwark up` and
`bulwark proc flower` set it), else from BULWARK_FLOWER_USER and
BULWARK_FLOWER_PASSWORD (or BULWARK_FLOWER_PASSWORD_FILE); with neither, it
refuses to start. Never from the command line, where `ps` would show them. The
passwords are masked in every log line.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from celery.bin.celery import main as celery_main

from workers.settings import Settings, get_settings
from workers.telemetry.logs import configure
from workers.telemetry.redact import remember_secrets

__all__ = ["basic_auth", "main", "passwords"]

NO_AUTH = (
    "bulwark: Flower never runs without basic auth: set BULWARK_FLOWER_PASSWORD (or "
    "BULWARK_FLOWER_PASSWORD_FILE, or FLOWER_BASIC_AUTH=user:password)"
)


def basic_auth(environ: Mapping[str, str], settings: Settings) -> str | None:
    """Flower's `user:password` credentials: FLOWER_BASIC_AUTH, else from the settings."""
    given = environ.get("FLOWER_BASIC_AUTH", "").strip()
    if given:
        return given
    password = settings.security.flower_password
    if password is None:
        return None
    return f"{settings.security.flower_user}:{password.reveal()}"


def passwords(auth: str) -> list[str]:
    """The passwords in `user:password[,user:password]`."""
    return [pair.split(":", 1)[1] for pair in auth.split(",") if ":" in pair]


def main(argv: list[str] | None = None) -> None:
    configure()
    auth = basic_auth(os.environ, get_settings())
    if auth is None:
        raise SystemExit(NO_AUTH)
    remember_secrets("flower", passwords(auth))
    os.environ["FLOWER_BASIC_AUTH"] = auth
    args = sys.argv[1:] if argv is None else argv
    sys.argv = ["celery", "-A", "workers.app", "--quiet", "flower", "--logging=none", *args]
    celery_main()


if __name__ == "__main__":
    main()
