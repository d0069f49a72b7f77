"""Task events on demand: off until a monitor asks (`enable_events`), off again when it stops."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import redis

from tests import kit
from tests.conftest import StartWorker
from tests.events import Events
from tests.kit import poll
from workers.celeryconfig import build_config
from workers.client import client
from workers.security import context
from workers.security.keys import dev_keys
from workers.settings import Settings, get_settings
from workers.telemetry import task_events


@pytest.mark.integration
def test_task_events_start_when_a_monitor_asks(
    r: redis.Redis, start_worker: StartWorker, events: Events, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = start_worker(["default"], name="ondemand")
    app = client()
    poll(lambda: events.of("worker-heartbeat"), deadline=30, what="the worker's heartbeat event")
    unwatched = app.send_task("bulwark.ping", args=["t"])
    assert unwatched.get(timeout=30)["token"] == "t"
    assert events.of("task-received", unwatched.id) == []
    assert events.of("task-sent") == [], "producers send no task-sent events on demand"

    # What Flower sends every 5 s, signed as the operator (as Flower's is).
    keys = dev_keys(Path(kit.SECURITY_ENV["BULWARK_TRUST_FILE"]).parent)
    for name, value in keys.env("operator").items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    context.forget()
    replies = client().control.enable_events(destination=[worker.hostname], reply=True, timeout=10)
    assert replies == [{worker.hostname: {"ok": "task events enabled"}}]
    watched = app.send_task("bulwark.ping", args=["t"])
    assert watched.get(timeout=30)["token"] == "t"
    poll(lambda: events.of("task-succeeded", watched.id), what="task-succeeded of the watched")
    assert events.of("task-received", watched.id)
    assert events.of("task-received", unwatched.id) == []


@pytest.mark.parametrize(("mode", "on"), [("on-demand", False), ("always", True)])
def test_the_setting_is_what_celery_starts_with(mode: str, on: bool) -> None:
    config = build_config(Settings.from_env({"BULWARK_TASK_EVENTS": mode}))
    assert config["worker_send_task_events"] is on  # `always` is `celery worker -E`
    assert config["task_send_sent_event"] is on


class TestLease:
    def consumer(self, groups: set[str]) -> SimpleNamespace:
        return SimpleNamespace(event_dispatcher=SimpleNamespace(groups=groups))

    def test_task_events_go_off_a_lease_after_the_last_ask(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        lease = task_events.Lease()
        monkeypatch.setattr(task_events, "lease", lease)
        now = [1000.0]
        monkeypatch.setattr(task_events.time, "monotonic", lambda: now[0])
        consumer = self.consumer({"worker", "task"})
        lease.renew()
        now[0] += task_events.LEASE
        task_events._expire(consumer)
        assert consumer.event_dispatcher.groups == {"worker", "task"}, "still within the lease"
        now[0] += 0.1
        task_events._expire(consumer)
        assert consumer.event_dispatcher.groups == {"worker"}
        assert lease.asked_at is None

    def test_never_asked_leaves_events_as_configured(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(task_events, "lease", task_events.Lease())
        consumer = self.consumer({"worker", "task"})  # `celery worker -E` on the command line
        task_events._expire(consumer)
        assert consumer.event_dispatcher.groups == {"worker", "task"}
