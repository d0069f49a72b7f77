"""Canary secrets through real parts: a redis-server that requires a password, a real worker
logging at debug, tasks carrying the secrets; no configured secret in any log line, in
`bulwark settings`, or in the settings' repr."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.kit import ROOT, Worker, child_env
from workers import resources
from workers.client import client
from workers.ops.embedded import EmbeddedRedis
from workers.settings import SettingsError, get_settings

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Canaries:
    """The configured secrets (never logged) and a marker (a plain argument, logged)."""

    webhook: str
    redis: str
    marker: str
    secret_file: Path

    @property
    def secrets(self) -> tuple[str, str]:
        return (self.webhook, self.redis)


@pytest.fixture
def canaries(tmp_path: Path) -> Canaries:
    path = tmp_path / "webhook-secret"
    webhook = f"canary-s3cr3t-{uuid.uuid4().hex}"
    path.write_text(webhook + "\n")
    path.chmod(0o600)
    return Canaries(webhook, f"canary-redis-{uuid.uuid4().hex}", uuid.uuid4().hex, path)


@pytest.fixture
def locked_redis(canaries: Canaries) -> Iterator[EmbeddedRedis]:
    """A redis-server of the test's own that requires the canary password."""
    server = EmbeddedRedis(password=canaries.redis).start()
    yield server
    server.stop()


def bare_url(server: EmbeddedRedis) -> str:
    """The server's URL without its password: Bulwark puts BULWARK_REDIS_PASSWORD in."""
    return f"redis://127.0.0.1:{server.port}/0"


def secret_env(server: EmbeddedRedis, canaries: Canaries) -> dict[str, str]:
    return {
        "REDIS_URL": bare_url(server),
        "BULWARK_REDIS_PASSWORD": canaries.redis,
        "BULWARK_ALERT_WEBHOOK_SECRET_FILE": str(canaries.secret_file),
        "BULWARK_LOG_LEVEL": "debug",
    }


def bulwark(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.ops.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


class TestCanarySecrets:
    """The configured secrets reach Redis and the alert sinks, and nothing that is read."""

    def test_no_secret_in_any_log_line(
        self,
        locked_redis: EmbeddedRedis,
        canaries: Canaries,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(bare_url(locked_redis)).ping()  # the password is needed

        env = secret_env(locked_redis, canaries)
        worker = Worker(
            locked_redis.url, ["default"], name="canary", env=env, log=tmp_path / "canary.log"
        )
        try:
            worker.start()
            for name, value in env.items():
                monkeypatch.setenv(name, value)
            get_settings.cache_clear()
            resources.forget()
            settings = get_settings()
            assert settings.redis_url == locked_redis.url
            assert settings.security.alert_webhook_secret is not None
            assert settings.security.alert_webhook_secret.reveal() == canaries.webhook
            shown = repr(settings) + str(settings)
            assert not [s for s in canaries.secrets if s in shown]

            app = client()
            # The secrets in a task's argument, next to a marker that is no secret.
            token = f"{canaries.marker} {canaries.webhook} {canaries.redis}"
            done = app.send_task("bulwark.ping", args=[token]).get(timeout=30)
            assert done["token"] == token
            # A task whose exception names a secret: an unexpected keyword argument.
            failed = app.send_task("bulwark.ping", kwargs={canaries.webhook: 1, "token": "t"})
            with pytest.raises(TypeError, match="unexpected keyword argument"):
                failed.get(timeout=30)
            app.close()
        finally:
            problems = worker.stop_and_check()
        assert not problems, "\n".join(problems)

        log = worker.log.read_text(errors="replace")
        lines = log.splitlines()
        leaked = [line for line in lines for s in canaries.secrets if s in line]
        assert not leaked, "\n".join(leaked[:5])
        # The argument was logged (Celery's debug line of the task's arguments), its secrets
        # masked in place; the exception too.
        assert any(f"{canaries.marker} *** ***" in line for line in lines), log[-3000:]
        assert any("unexpected keyword argument '***'" in line for line in lines), log[-3000:]
        assert any('"level": "debug"' in line for line in lines), "logged at debug"

    def test_not_in_bulwark_settings(self, locked_redis: EmbeddedRedis, canaries: Canaries) -> None:
        env = child_env(bare_url(locked_redis), secret_env(locked_redis, canaries))
        done = bulwark(env, "settings")
        assert done.returncode == 0, done.stderr
        assert "BULWARK_REDIS_PASSWORD" in done.stdout
        assert "BULWARK_ALERT_WEBHOOK_SECRET_FILE" in done.stdout
        out = done.stdout + done.stderr
        assert not [s for s in canaries.secrets if s in out]
        markdown = bulwark(env, "settings", "--markdown")
        assert markdown.returncode == 0
        assert not [s for s in canaries.secrets if s in markdown.stdout + markdown.stderr]

    def test_group_readable_secret_file_is_refused(
        self,
        locked_redis: EmbeddedRedis,
        canaries: Canaries,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        canaries.secret_file.chmod(0o640)
        env = secret_env(locked_redis, canaries)
        expected = (
            f"secret file {canaries.secret_file} is readable by group or others (mode 640); "
            f"run: chmod 600 {canaries.secret_file}"
        )
        # in process
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        with pytest.raises(SettingsError, match="BULWARK_ALERT_WEBHOOK_SECRET_FILE") as refused:
            get_settings()
        assert expected in str(refused.value)
        # the command
        done = bulwark(child_env(bare_url(locked_redis), env), "settings")
        assert done.returncode == 2 and expected in done.stderr
        # a real worker does not start
        worker = Worker(
            locked_redis.url, ["default"], name="refused", env=env, log=tmp_path / "refused.log"
        )
        with pytest.raises(AssertionError, match="worker exited early"):
            worker.start()
        log = worker.log.read_text(errors="replace")
        assert expected in log
        assert not [s for s in canaries.secrets if s in log]
        worker.stop()
