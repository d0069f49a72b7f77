"""Worker and beat lifecycle: preflight, readiness and heartbeat keys in Redis.

A worker that cannot reach Redis at start exits within 10 s with a message
naming the URL (password hidden), instead of retrying forever in silence.
Once ready, each worker keeps `bulwark:{worker:<hostname>}:heartbeat` alive
with a TTL, so the fleet (and the tests) can see which workers are up.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

from celery import signals

from policies import keys
from workers.embedded import RedisUnavailable, wait_for_redis
from workers.resources import policy_redis
from workers.settings import SettingsError, get_settings

logger = logging.getLogger(__name__)

_stop = threading.Event()


def heartbeat_key(hostname: str) -> str:
    return keys.key("worker", hostname, "heartbeat")


def _preflight() -> None:
    try:
        settings = get_settings()
    except SettingsError as exc:
        raise SystemExit(f"bulwark: {exc}") from None
    for url in {settings.redis_url, settings.broker}:
        try:
            wait_for_redis(url, deadline=10.0).close()
        except RedisUnavailable as exc:
            raise SystemExit(f"bulwark: {exc}") from None


@signals.worker_init.connect
def _on_worker_init(**_: Any) -> None:
    _preflight()


@signals.beat_init.connect
def _on_beat_init(**_: Any) -> None:
    _preflight()


def _beat(hostname: str, queues: list[str]) -> None:
    ttl = get_settings().observability.heartbeat_ttl
    key = heartbeat_key(hostname)
    while not _stop.is_set():
        try:
            value = {"hostname": hostname, "pid": os.getpid(), "queues": queues, "at": time.time()}
            policy_redis().set(key, json.dumps(value), px=int(ttl * 1000))
        except Exception:
            logger.warning("heartbeat write failed for %s", hostname, exc_info=True)
        _stop.wait(ttl / 3)


@signals.worker_process_init.connect
def _on_worker_process_init(**_: Any) -> None:
    from workers.guard import ensure_listeners

    ensure_listeners()


@signals.worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    hostname = sender.hostname
    queues = sorted(q.name for q in sender.app.amqp.queues.consume_from.values())
    _stop.clear()
    threading.Thread(
        target=_beat, args=(hostname, queues), name="bulwark-heartbeat", daemon=True
    ).start()
    logger.info("worker ready: %s consuming %s", hostname, ",".join(queues))


@signals.worker_shutdown.connect
def _on_worker_shutdown(sender: Any = None, **_: Any) -> None:
    _stop.set()
    hostname = getattr(sender, "hostname", None)
    if hostname:
        try:
            policy_redis().delete(heartbeat_key(hostname))
        except Exception:
            logger.warning("could not clear heartbeat of %s", hostname, exc_info=True)
