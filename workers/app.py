"""The Celery app: `celery -A workers.app worker|beat|flower`.

Configuration is added lazily: the environment is read when Celery first
needs its configuration, not at import.
"""

from __future__ import annotations

from celery import Celery

from workers.celeryconfig import build_config
from workers.settings import get_settings

app = Celery(
    "bulwark",
    include=["tasks.catalogue"],
)
app.add_defaults(lambda: build_config(get_settings()))

# Signal handlers (readiness, heartbeats, preflight) live with the worker lifecycle.
import workers.lifecycle  # noqa: E402,F401
