"""A small test kit: deadline polls and real worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import redis

from policies import keys

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def poll(
    check: Callable[[], T], *, deadline: float = 15.0, every: float = 0.05, what: str = ""
) -> T:
    """Call `check` until it returns something truthy; fail after `deadline` seconds."""
    end = time.monotonic() + deadline
    last: T | None = None
    while time.monotonic() < end:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(
        f"timed out after {deadline:g} s waiting for {what or check!r} (last: {last!r})"
    )


def child_env(redis_url: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BULWARK_", "CELERY_"))}
    env.update(
        REDIS_URL=redis_url,
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
        PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
    )
    env.update(extra or {})
    return env


class Worker:
    """A real `celery worker` subprocess; ready once its heartbeat key is in Redis."""

    def __init__(
        self,
        redis_url: str,
        queues: Sequence[str],
        *,
        name: str,
        concurrency: int = 2,
        env: Mapping[str, str] | None = None,
        log: Path,
    ) -> None:
        self.redis_url = redis_url
        self.hostname = f"{name}@test"
        self.log = log
        self.command = [
            sys.executable, "-m", "celery", "-A", "workers.app", "worker",
            "-Q", ",".join(queues), "-n", self.hostname, "-c", str(concurrency),
            "--without-mingle", "--without-gossip", "--loglevel=INFO",
        ]  # fmt: skip
        self.env = child_env(redis_url, env)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, deadline: float = 30.0) -> Worker:
        out = self.log.open("ab")
        self.process = subprocess.Popen(
            self.command, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        client = redis.Redis.from_url(self.redis_url)
        key = keys.key("worker", self.hostname, "heartbeat")

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"worker exited early:\n{self.log.read_text()[-3000:]}")
            return bool(client.exists(key))

        poll(ready, deadline=deadline, what=f"worker {self.hostname} ready")
        return self

    def stop(self, timeout: float = 15.0) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode
