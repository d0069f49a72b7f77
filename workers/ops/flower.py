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

Flower reads results (`/api/task/result`, `/api/task/apply`) through
`SealedResults`: verified as every reader verifies them, and an encrypted task's
never opened; it shows "(sealed)", as its events show its exception by type only.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

from celery import Celery, states
from celery.bin.celery import main as celery_main

from workers.app import app
from workers.security import sealed
from workers.security.context import security
from workers.security.results import SignedRedisBackend, verified
from workers.settings import Settings, get_settings
from workers.telemetry.logs import configure
from workers.telemetry.redact import remember_secrets

__all__ = ["SealedResults", "basic_auth", "install_results", "main", "passwords"]

#: An encrypted task's failure as Flower reads it: an exception Celery can rebuild.
SEALED_FAILURE = {"exc_type": "Exception", "exc_module": "builtins",
                  "exc_message": [sealed.SEALED_TEXT]}  # fmt: skip

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


def _shown(meta: Any) -> Any:
    """A stored meta as Flower shows it: an encrypted task's result stays sealed."""
    if not isinstance(meta, dict) or not sealed.is_sealed(meta.get("result")):
        return meta
    failed = meta.get("status") in states.EXCEPTION_STATES
    return {**meta, "result": dict(SEALED_FAILURE) if failed else sealed.SEALED_TEXT}


class SealedResults(SignedRedisBackend):
    """The result backend of Flower: a result is verified (`SignedRedisBackend`), and an
    encrypted task's is not opened: Flower holds the key ring only to seal what it sends."""

    def decode(self, payload: Any) -> Any:
        if payload is not None and security().enabled:
            payload = verified(payload)
        return _shown(super(SignedRedisBackend, self).decode(payload))


def install_results(celery_app: Celery) -> None:
    """Make `celery_app`'s `redis://` and `rediss://` result backends `SealedResults`."""
    name = f"{__name__}:SealedResults"
    loader = celery_app.loader
    loader.override_backends = {**loader.override_backends, "redis": name, "rediss": name}


def main(argv: list[str] | None = None) -> None:
    configure()
    auth = basic_auth(os.environ, get_settings())
    if auth is None:
        raise SystemExit(NO_AUTH)
    remember_secrets("flower", passwords(auth))
    os.environ["FLOWER_BASIC_AUTH"] = auth
    install_results(app)
    args = sys.argv[1:] if argv is None else argv
    sys.argv = ["celery", "-A", "workers.app", "--quiet", "flower", "--logging=none", *args]
    celery_main()


if __name__ == "__main__":
    main()
