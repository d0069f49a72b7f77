"""A real worker's /metrics over HTTP: prefork children's counts, histograms, queue gauges."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from policies import keys
from tests.kit import ROOT, child_env, poll
from workers.client import client
from workers.fleet import read_fleet
from workers.telemetry.http import wait_address

pytestmark = pytest.mark.integration


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples.get((name, frozenset(labels.items())), 0.0)


README = Path(__file__).parents[3] / "README.md"


def readme_producer_hook() -> str:
    """The README's hook for a plain Celery producer (the block that stamps `bulwark_sent_at`)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (hook,) = [b for b in blocks if "bulwark_sent_at" in b]
    return hook


def plain_producer(redis_url: str, hook: str, tokens: list[str]) -> None:
    """Send pings from a plain Celery app in a process of its own, as another service would."""
    code = (
        "import os\nfrom celery import Celery\n"
        + hook
        + "\napp = Celery('plain', broker=os.environ['REDIS_URL'])\n"
        + "app.conf.update(task_serializer='json', accept_content=['json'])\n"
        + "".join(f"app.send_task('bulwark.ping', args=[{t!r}], queue='default')\n" for t in tokens)
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=child_env(redis_url), cwd=ROOT,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


class TestWorkerMetrics:
    """Counters move after real tasks, counted in prefork children and summed by the worker."""

    def test_counts_histograms_and_queue_gauges(
        self, r: redis.Redis, start_worker, tmp_path: Path
    ) -> None:
        folder = tmp_path / "metrics"
        worker = start_worker(["default"], name="metered", env={"BULWARK_METRICS_DIR": str(folder)})
        url = wait_address(r, worker.hostname)["url"]
        app = client()
        good = [app.send_task("bulwark.ping", args=[uuid.uuid4().hex]) for _ in range(6)]
        bad = app.send_task("bulwark.ping", args=[])  # TypeError in the task: failed
        for result in good:
            result.get(timeout=30)
        with pytest.raises(TypeError):
            bad.get(timeout=30, propagate=True)
        task, queue = "bulwark.ping", "default"

        def counted() -> dict | None:  # type: ignore[type-arg]
            # A result is stored before the task's postrun signal: wait for every postrun.
            s = scrape(url)
            done = sum(
                sample(s, "bulwark_tasks_total", task=task, queue=queue, state=state)
                for state in ("succeeded", "failed")
            )
            runs = sample(s, "bulwark_task_runtime_seconds_count", task=task, queue=queue)
            return s if done >= 7 and runs >= 7 else None

        s = poll(counted, deadline=30, what="every task counted")
        assert sample(s, "bulwark_tasks_total", task=task, queue=queue, state="received") == 7
        assert sample(s, "bulwark_tasks_total", task=task, queue=queue, state="started") == 7
        assert sample(s, "bulwark_tasks_total", task=task, queue=queue, state="succeeded") == 6
        assert sample(s, "bulwark_tasks_total", task=task, queue=queue, state="failed") == 1
        assert sample(s, "bulwark_task_runtime_seconds_count", task=task, queue=queue) == 7
        assert sample(s, "bulwark_task_queue_wait_seconds_count", task=task, queue=queue) == 7
        waited = sample(s, "bulwark_task_queue_wait_seconds_sum", task=task, queue=queue)
        assert 0 < waited < 7 * 30, "seconds from each send to its start, not since 1970"
        # No hostname label on task counters.
        assert not any(
            name == "bulwark_tasks_total" and "hostname" in dict(labels) for name, labels in s
        )
        # Tasks ran in children: their pids wrote the sample files the worker summed.
        main_pid = worker.process.pid
        writers = {int(p.stem.rsplit("_", 1)[1]) for p in (folder / "metered@test").glob("*.db")}
        assert writers - {main_pid}, f"only the main process wrote metrics: {writers}"

        # A task with a countdown is reserved by the worker: unacked and scheduled, not ready.
        # (The acknowledgement of the failed task above may still be on its way: a child
        # counts a task before the main process acknowledges it.)
        later = app.send_task("bulwark.ping", args=["later"], countdown=120)
        broker = redis.Redis.from_url(os.environ["REDIS_URL"])

        def reserved() -> tuple[int, int, int] | None:
            q = read_fleet(r, broker, ["default"]).queue("default")
            found = (q.ready, q.unacked, q.scheduled)
            return found if q.scheduled and q.unacked == 1 else None

        assert poll(reserved, what="only the reserved task held") == (0, 1, 1)
        later.revoke()

    def test_queue_depth_counts_priority_sub_queues(self, r: redis.Redis) -> None:
        app = client()
        for priority in (None, 0, 5, 9):
            options = {} if priority is None else {"priority": priority}
            app.send_task("inventory.reserve", args=["sku", 1], **options)
        sub_queues = [k for k in r.keys("inventory*") if k != b"inventory"]
        assert sub_queues, "priorities landed in kombu's sub-queue lists"
        snap = read_fleet(r, r, ["inventory", "payments"])
        assert snap.queue("inventory").ready == 4 and snap.queue("payments").ready == 0
        assert sum(snap.queue("inventory").by_priority) == 4


class TestPolicyStateMetrics:
    """Deferred, retried and dead-lettered tasks are counted by a real worker, by task and queue."""

    def test_deferred_retried_and_dead_lettered(self, r: redis.Redis, start_worker) -> None:
        from policies.bulkhead import Bulkhead, BulkheadConfig
        from tasks.dependencies import dependency

        fast = {"BULWARK_RETRY_BASE_DELAY": "0.05", "BULWARK_RETRY_MAX_DELAY": "0.2",
                "BULWARK_DEFER_MAX_DELAY": "0.3"}  # fmt: skip
        worker = start_worker(["payments"], name="payments", env=fast)
        url = wait_address(r, worker.hostname)["url"]
        app = client()
        # Permanent failure: straight to the dead-letter store.
        with pytest.raises(ValueError):
            app.send_task("payments.charge", args=["o-bad", 0]).get(timeout=30)
        # A full bulkhead: deferred until the permits come back.
        hold = Bulkhead("payments", r, BulkheadConfig(limit=4))
        leases = [hold.try_acquire() for _ in range(4)]
        deferred = app.send_task("payments.charge", args=["o-wait", 100])
        poll(lambda: deferred.state == "RETRY", what="the task to be deferred")
        for lease in leases:
            lease.release()
        deferred.get(timeout=30)
        # A transient failure: retried, then (the gateway still down) dead-lettered.
        dependency("payments").set_outage(60)
        with pytest.raises(ConnectionError):
            app.send_task("payments.charge", args=["o-down", 100]).get(timeout=30)
        labels = {"task": "payments.charge", "queue": "payments"}

        def counted() -> dict | None:  # type: ignore[type-arg]
            s = scrape(url)
            return (
                s
                if sample(s, "bulwark_tasks_total", state="dead_lettered", **labels) >= 2
                else None
            )

        s = poll(counted, deadline=30, what="both dead letters counted")
        assert sample(s, "bulwark_tasks_total", state="dead_lettered", **labels) == 2
        assert sample(s, "bulwark_tasks_total", state="deferred", **labels) >= 1
        assert sample(s, "bulwark_tasks_total", state="retried", **labels) == 2
        assert sample(s, "bulwark_bulkhead_rejections_total", bulkhead="payments") >= 1


class TestExpired:
    """A task whose `expires` passed before it ran is counted and logged with its id."""

    def test_expired_task(self, r: redis.Redis, start_worker) -> None:
        worker = start_worker(["default"], name="expiring")
        url = wait_address(r, worker.hostname)["url"]
        past = datetime.now(UTC) - timedelta(minutes=1)
        late = client().send_task("bulwark.ping", args=["late"], expires=past)
        labels = {"task": "bulwark.ping", "queue": "default", "state": "expired"}
        poll(lambda: sample(scrape(url), "bulwark_tasks_total", **labels) == 1, what="counted")
        log = worker.log.read_text()
        assert f"task bulwark.ping[{late.id}] expired before it could run" in log
        assert r.llen(keys.key("diagnostics", "ping", "tokens")) == 0, "it did not run"

    def test_queue_wait_of_a_plain_celery_producer(
        self, r: redis.Redis, redis_url: str, start_worker
    ) -> None:
        """A producer with its own Celery app and the README's hook: its tasks are signed
        (they run) and stamped (their queue wait is measured); signed alone, only run."""
        worker = start_worker(["default"], name="plain-producer")
        url = wait_address(r, worker.hostname)["url"]
        plain_producer(redis_url, "from workers.security import signer\nsigner.connect()\n",
                       ["signed, not stamped"])  # fmt: skip
        plain_producer(redis_url, readme_producer_hook(), [f"hooked {n}" for n in range(3)])

        def runs() -> dict | None:  # type: ignore[type-arg]
            s = scrape(url)
            name = "bulwark_task_runtime_seconds_count"
            n = sample(s, name, task="bulwark.ping", queue="default")
            return s if n >= 4 else None

        s = poll(runs, deadline=30, what="the plain producer's tasks run")
        waits = sample(
            s, "bulwark_task_queue_wait_seconds_count", task="bulwark.ping", queue="default"
        )
        assert waits == 3, "the three stamped sends are measured, the unstamped one is not"
