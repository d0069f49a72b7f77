"""Beat in two copies: one leads and sends, the other stands by; each run once per slot.

`LeaderScheduler` (the app's `beat_scheduler`) is Celery's PersistentScheduler,
sending only while it holds the `beat` leadership (`policies.leader`). Every
`BULWARK_BEAT_LOCK_TTL / 3` seconds it takes or renews the lock; a standby asks
as often, so when the leader dies it takes over within the TTL (10 s), not
RedBeat's 25 minutes. Before sending a due entry the leader claims the entry's
time slot with its fencing token: a slot is sent once fleet-wide, even when a
new leader takes over in the middle of an interval, and a leader that lost the
lock while paused sends nothing. The message carries the slot in its
`bulwark_beat_slot` header. A clean stop gives the lock up at once.

Why not celery-redbeat: its lock has no fencing token (a paused leader whose
lock expired still sends), and it keeps a run from repeating only if the old
leader saved the entry's last run before it died; here the claim is made, in
Redis, before the send.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import time
from datetime import UTC, datetime
from typing import Any

import redis
from celery.beat import PersistentScheduler, ScheduleEntry

from policies.leader import DEPOSED, RAN_ALREADY, Leadership, slot_of
from workers.fleet import read_fleet
from workers.resources import broker, policy_redis
from workers.scaling.fleet import FleetScaler
from workers.scaling.groups import read_groups
from workers.settings import get_settings

__all__ = ["SLOT_HEADER", "LeaderScheduler", "leading"]

logger = logging.getLogger(__name__)

#: Header of every message beat sends: `<entry name>:<slot>`.
SLOT_HEADER = "bulwark_beat_slot"
#: Slot width of an entry without a fixed interval (a crontab): a minute.
CRONTAB_SLOT = 60.0


_leading = True  # a process without LeaderScheduler (a single beat of another app) leads


def leading() -> bool:
    """Whether this process is the leading beat (true in any process not running
    `LeaderScheduler`): only the leader serves the fleet gauges, so that two beats
    scraped by Prometheus do not count the fleet twice."""
    return _leading


def interval_of(entry: ScheduleEntry) -> float:
    """Seconds between two runs of `entry` (its slot width)."""
    every = getattr(entry.schedule, "run_every", None)
    seconds = every.total_seconds() if every is not None else CRONTAB_SLOT
    return max(1.0, float(seconds))


class LeaderScheduler(PersistentScheduler):  # type: ignore[misc]
    """Celery's persistent scheduler that sends only as the fleet's one beat leader."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._ttl = get_settings().scaling.beat_lock_ttl
        holder = f"{socket.gethostname()}:{os.getpid()}"
        self._leadership = Leadership(policy_redis(), "beat", holder, self._ttl)
        self._token: int | None = None
        self._said = False  # the first answer is logged, leading or not
        self._ask_at = 0.0
        self._scaler: FleetScaler | None = None
        self._said_scaling: dict[str, tuple[int, int]] = {}
        self._scale_every = get_settings().scaling.fleet_scale_interval
        self._scale_at = 0.0
        _set_leading(False)
        super().__init__(*args, **kwargs)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        now = time.monotonic()
        if now >= self._ask_at:
            self._hold(now)
        if self._token is None:
            return self._ttl / 3  # standing by: ask again then
        if now >= self._scale_at:
            self._scale_at = now + self._scale_every
            self._scale()
        wait = min(super().tick(*args, **kwargs), self._ttl / 3)
        return float(min(wait, max(0.0, self._scale_at - time.monotonic())))

    def _scale(self) -> None:
        """The fleet scaling decisions (workers.scaling.fleet); a failure only skips a turn."""
        try:
            if self._scaler is None:
                settings = get_settings()
                groups = read_groups(settings)
                self._scaler = FleetScaler(self.app, settings, groups, policy_redis())
                logger.info("beat: fleet scaling of %s every %.0f s",
                            ", ".join(g.name for g in groups) or "no worker group",
                            self._scale_every)  # fmt: skip
            scaler = self._scaler
            decisions = scaler.step(read_fleet(policy_redis(), broker(), scaler.queues))
        except Exception as exc:  # Redis away, a Procfile that does not read: beat goes on
            logger.warning("beat: no fleet scaling decision this time: %s", exc)
            return
        for d in decisions:  # logged when the wish or the count changes
            said = (d.desired, d.current)
            if d.desired != d.current and self._said_scaling.get(d.group) != said:
                logger.info("scaling: %s wants %d workers (has %d): %s",
                            d.group, d.desired, d.current, d.reason)  # fmt: skip
            self._said_scaling[d.group] = said

    def _hold(self, now: float) -> None:
        self._ask_at = now + self._ttl / 3
        try:
            token = self._leadership.hold()
        except redis.RedisError as exc:
            if self._token is not None:
                logger.warning("beat: Redis unreachable (%s): not sending until it is back", exc)
            token = None
        if token != self._token or not self._said:
            self._said = True
            if token is not None:
                logger.info("beat: leading (fencing token %d)", token)
            else:
                logger.info("beat: standing by; another beat leads")
        self._token = token
        _set_leading(token is not None)

    def apply_entry(self, entry: ScheduleEntry, producer: Any = None) -> None:
        token = self._token
        if token is None:
            return
        every = interval_of(entry)
        now = time.time()
        slot = slot_of(now, every)
        try:
            if self._sent_by_another(entry):
                return
            claimed = self._leadership.claim(
                token, entry.name, slot, now, keep=max(3600.0, 2 * every)
            )
        except (redis.RedisError, ValueError) as exc:
            logger.warning("beat: %s not sent: its slot could not be claimed (%s)", entry.name, exc)
            return
        if claimed == DEPOSED:
            logger.warning("beat: no longer the leader; %s not sent", entry.name)
            self._token, self._ask_at = None, 0.0
            _set_leading(False)
            return
        if claimed == RAN_ALREADY:
            logger.info("beat: %s slot %d was sent already (by another beat)", entry.name, slot)
            return
        marked = copy.copy(entry)  # the schedule's own entry keeps its options as they are
        headers = {**(entry.options.get("headers") or {}), SLOT_HEADER: f"{entry.name}:{slot}"}
        marked.options = {**entry.options, "headers": headers}
        super().apply_entry(marked, producer=producer)

    def _sent_by_another(self, entry: ScheduleEntry) -> bool:
        """Whether the fleet sent `entry` more recently than this beat knows, recently enough
        that it is not due again yet (a standby's own schedule did not move while it stood
        by: the run it thinks overdue may have gone out just before it took over)."""
        last = self._leadership.last_sent(entry.name)
        if last is None:
            return False
        sent = datetime.fromtimestamp(last, UTC)
        known = entry.last_run_at
        if known is not None and known.tzinfo is not None and sent <= known:
            return False
        due, _ = entry.schedule.is_due(sent)
        if due:
            return False
        logger.info("beat: %s was sent by another beat at %s; not due again yet",
                    entry.name, sent.isoformat())  # fmt: skip
        return True

    def close(self) -> None:
        try:
            self._leadership.release()
        except redis.RedisError:
            logger.warning("beat: could not give the leadership up; it lapses in %.0f s", self._ttl)
        super().close()


def _set_leading(value: bool) -> None:
    global _leading
    _leading = value
