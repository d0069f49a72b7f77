"""Bulwark over `rediss://`: a real TLS-only redis-server, certificates verified end to end.

A private CA signs the server's certificate (`tests.certs`); clients trust that
CA through `ssl_ca_certs` in the URL and require verification with
`ssl_cert_reqs=required`. redis-py, kombu's Redis transport and Celery's Redis
backend each read those two query arguments from a rediss URL (kombu gathers
`ssl_*` into `Connection.ssl`; Celery's backend maps "required" to
`ssl.CERT_REQUIRED`). Without them kombu falls back to CERT_NONE with only a
warning, so the tests check that verification is really on: a client that
trusts another CA is refused.
"""

from __future__ import annotations

import contextlib
import ssl
import subprocess
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from kombu.exceptions import OperationalError

from policies import keys
from policies.deadletter import DeadLetterStore
from policies.once import ExecuteOnce
from tests.certs import TlsFiles, authority, server_files
from tests.kit import Worker, free_port, need, poll
from workers import guard, resources, settings
from workers.celeryconfig import build_config
from workers.client import client
from workers.ops.embedded import find_redis_server
from workers.resources import RedisUnavailable, policy_redis, wait_for_redis

pytestmark = pytest.mark.integration

TOKENS = keys.key("diagnostics", "ping", "tokens")
#: What redis-server says of `--tls-port` when it was built without TLS.
NO_TLS_SIGNS = ("Bad directive", "wrong number of arguments", "TLS not supported")


class NoTls(Exception):
    """This redis-server was built without TLS."""


class _Exited(Exception):
    """redis-server exited before it answered; the message is its output."""


class TlsRedis:
    """A redis-server that listens only for TLS (`--port 0`) on a free loopback port."""

    def __init__(self, folder: Path, tls: TlsFiles) -> None:
        self.binary = find_redis_server()
        self.folder = folder
        self.tls = tls
        self.log = folder / "redis.out"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, ca: Path | None = None, *, cert_reqs: str = "required") -> str:
        """The rediss URL of db 0, trusting `ca` (the server's own CA by default)."""
        query = urllib.parse.urlencode(
            {"ssl_cert_reqs": cert_reqs, "ssl_ca_certs": str(ca or self.tls.ca)}
        )
        return f"rediss://127.0.0.1:{self.port}/0?{query}"

    def start(self, deadline: float = 10.0) -> TlsRedis:
        """Start and wait for a verified PING; never leaves a server behind if that fails."""
        for _attempt in range(5):
            self.port = free_port()
            self._spawn()
            try:
                poll(self._ready, deadline=deadline, what=f"TLS redis-server on {self.port}")
                return self
            except _Exited as exited:
                self.stop()
                output = str(exited)
                if any(sign in output for sign in NO_TLS_SIGNS) and "tls" in output.lower():
                    raise NoTls(" ".join(output.split())[-300:]) from None
                if "already in use" not in output:
                    raise AssertionError(f"redis-server exited:\n{output[-3000:]}") from None
                # Lost the port to another process between bind and start: try another.
            except BaseException:
                self.stop()
                raise
        raise AssertionError(f"no free port for redis-server; see {self.log}")

    def _spawn(self) -> None:
        command = [
            self.binary,
            "--port", "0",
            "--tls-port", str(self.port),
            "--bind", "127.0.0.1",
            "--tls-cert-file", str(self.tls.cert),
            "--tls-key-file", str(self.tls.key),
            "--tls-ca-cert-file", str(self.tls.ca),
            "--tls-auth-clients", "no",
            "--dir", str(self.folder),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
        ]  # fmt: skip
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                command, cwd=self.folder, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def _ready(self) -> bool:
        """One TLS PING (the chain verified, not the name: a test may serve a misnamed
        certificate on purpose); raise `_Exited` if the server died."""
        assert self.process is not None
        if self.process.poll() is not None:
            raise _Exited(self.log.read_text(errors="replace"))
        try:
            with redis.Redis.from_url(
                self.url(), socket_connect_timeout=1.0, socket_timeout=1.0, ssl_check_hostname=False
            ) as probe:
                return bool(probe.ping())
        except redis.ConnectionError:
            return False

    def stop(self, timeout: float = 5.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@contextlib.contextmanager
def serving(
    folder: Path, *, ips: tuple[str, ...] = ("127.0.0.1",), dns: tuple[str, ...] = ("localhost",)
) -> Iterator[TlsRedis]:
    """A TLS-only redis-server in `folder`, its certificate (for `ips`, `dns`) from a new CA."""
    folder.mkdir()
    server = TlsRedis(folder, server_files(folder, ips=ips, dns=dns))
    try:
        server.start()
    except NoTls as exc:
        need(False, f"redis-server built with TLS (it said: {exc})")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    """A TLS-only redis-server for this test; its certificate names 127.0.0.1 and localhost."""
    with serving(tmp_path / "tls") as server:
        yield server


@pytest.fixture
def misnamed_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    """A TLS-only redis-server whose certificate (from its trusted CA) names another host."""
    with serving(tmp_path / "misnamed", ips=(), dns=("elsewhere.invalid",)) as server:
        yield server


@pytest.fixture
def other_ca(tmp_path: Path) -> Path:
    """The certificate of a CA that signed nothing the server has."""
    return authority("Some other CA").write(tmp_path / "other-ca")


@pytest.fixture
def on_tls(tls_redis: TlsRedis, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point this process's settings (policies, broker, backend) at the TLS server."""
    url = tls_redis.url()
    monkeypatch.setenv("REDIS_URL", url)
    settings.get_settings.cache_clear()
    resources.forget()
    guard.forget_guards()
    return url


def _refused_for_trust(error: BaseException, port: int) -> None:
    """The error says the certificate did not verify, and where."""
    text = str(error)
    assert "CERTIFICATE_VERIFY_FAILED" in text, text
    assert "certificate verify failed" in text, text
    assert f"127.0.0.1:{port}" in text, text


class TestTlsRedis:
    """redis-py over rediss:// verifies the server's certificate against the CA in the URL."""

    def test_ping_with_the_servers_ca(self, tls_redis: TlsRedis) -> None:
        with redis.Redis.from_url(tls_redis.url()) as client_:
            assert client_.ping() is True
            assert client_.connection_pool.connection_class is redis.SSLConnection

    def test_another_ca_is_refused_with_a_clear_error(
        self, tls_redis: TlsRedis, other_ca: Path
    ) -> None:
        with (
            redis.Redis.from_url(tls_redis.url(other_ca), socket_connect_timeout=2) as client_,
            pytest.raises(redis.ConnectionError) as info,
        ):
            client_.ping()
        _refused_for_trust(info.value, tls_redis.port)

    def test_a_certificate_for_another_host_is_refused(self, misnamed_redis: TlsRedis) -> None:
        """The CA is trusted, but the certificate does not name 127.0.0.1: hostnames are checked."""
        with (
            redis.Redis.from_url(misnamed_redis.url(), socket_connect_timeout=2) as client_,
            pytest.raises(redis.ConnectionError) as info,
        ):
            client_.ping()
        _refused_for_trust(info.value, misnamed_redis.port)
        assert "mismatch" in str(info.value)

    def test_plain_redis_is_not_served(self, tls_redis: TlsRedis) -> None:
        """Only TLS listens: a plaintext client gets nothing (no silent downgrade)."""
        plain = f"redis://127.0.0.1:{tls_redis.port}/0"
        with (
            redis.Redis.from_url(plain, socket_connect_timeout=2, socket_timeout=2) as client_,
            pytest.raises(redis.ConnectionError),
        ):
            client_.ping()


class TestBulwarkClientsOverTls:
    """Bulwark's settings, start-up check, policy client, producer and backend take rediss://."""

    def test_settings_and_celery_config_keep_the_rediss_url(self, tls_redis: TlsRedis) -> None:
        url = tls_redis.url()
        parsed = settings.Settings.from_env({"REDIS_URL": url})
        assert parsed.redis_url == parsed.broker == parsed.backend == url
        config = build_config(parsed)
        assert config["broker_url"] == config["result_backend"] == url

    def test_wait_for_redis_over_tls(self, tls_redis: TlsRedis, other_ca: Path) -> None:
        with wait_for_redis(tls_redis.url(), deadline=5.0) as client_:
            assert client_.ping() is True
        with pytest.raises(RedisUnavailable) as info:
            wait_for_redis(tls_redis.url(other_ca), deadline=0.5)
        _refused_for_trust(info.value, tls_redis.port)
        assert "ssl_ca_certs" in str(info.value), "the CA path is part of the URL shown"

    def test_policies_run_their_scripts_over_tls(self, on_tls: str) -> None:
        once = ExecuteOnce(policy_redis())
        assert once.begin("tls-task", owner="test").action == "run"
        assert once.begin("tls-task", owner="test").action == "running"
        assert policy_redis().connection_pool.connection_class is redis.SSLConnection

    def test_producer_and_backend_verify_the_certificate(self, on_tls: str) -> None:
        app = client()
        with app.connection_for_write() as conn:
            assert conn.ssl["ssl_cert_reqs"] == ssl.CERT_REQUIRED
            assert conn.ssl["ssl_ca_certs"] == _ca(on_tls)
            assert conn.default_channel.client.ping() is True
        backend = app.backend
        assert backend.connparams["ssl_cert_reqs"] == ssl.CERT_REQUIRED
        assert backend.connparams["ssl_ca_certs"] == _ca(on_tls)
        assert backend.client.ping() is True

    def test_producer_trusting_another_ca_is_refused(
        self, tls_redis: TlsRedis, other_ca: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("REDIS_URL", tls_redis.url(other_ca))
        settings.get_settings.cache_clear()
        app = client()
        with app.connection_for_write() as conn, pytest.raises(OperationalError) as info:
            conn.ensure_connection(max_retries=0)
        _refused_for_trust(info.value, tls_redis.port)

    def test_producer_refuses_a_certificate_for_another_host(
        self, misnamed_redis: TlsRedis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("REDIS_URL", misnamed_redis.url())
        settings.get_settings.cache_clear()
        with client().connection_for_write() as conn, pytest.raises(OperationalError) as info:
            conn.ensure_connection(max_retries=0)
        _refused_for_trust(info.value, misnamed_redis.port)
        assert "mismatch" in str(info.value)

    def test_a_rediss_url_without_ssl_cert_reqs_is_never_unverified(
        self, tls_redis: TlsRedis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Either the settings refuse it, naming ssl_cert_reqs, or the broker verifies anyway
        (the system's CAs do not know the test CA, so the connection must fail)."""
        bare = f"rediss://127.0.0.1:{tls_redis.port}/0"
        try:
            parsed = settings.Settings.from_env({"REDIS_URL": bare})
        except settings.SettingsError as exc:
            assert "ssl_cert_reqs" in str(exc)
            return
        monkeypatch.setenv("REDIS_URL", bare)
        settings.get_settings.cache_clear()
        with client(parsed).connection_for_write() as conn, pytest.raises(OperationalError):
            conn.ensure_connection(max_retries=0)


def _ca(url: str) -> str:
    return urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["ssl_ca_certs"][0]


@pytest.fixture
def tls_worker(on_tls: str, tmp_path: Path) -> Iterator[Worker]:
    """A real worker on `default`; its policies, broker and backend are the TLS server."""
    worker = Worker(on_tls, ["default"], name="tls", log=tmp_path / "tls-worker.log")
    try:
        yield worker.start(deadline=40.0)
    finally:
        problems = worker.stop_and_check()
    assert not problems, "\n".join(problems)


class TestWorkerOverTls:
    """A real worker serves tasks with Redis reached only over verified TLS."""

    def test_ping_task_runs_and_returns(self, on_tls: str, tls_worker: Worker) -> None:
        token = uuid.uuid4().hex
        result = client().send_task("bulwark.ping", args=[token])
        assert result.get(timeout=30) == {"token": token, "worker": tls_worker.hostname}
        assert token.encode() in policy_redis().lrange(TOKENS, 0, -1)

    def test_poison_is_quarantined_and_the_worker_goes_on(
        self, on_tls: str, tmp_path: Path
    ) -> None:
        worker = Worker(on_tls, ["default"], name="tls-guard", log=tmp_path / "guard.log")
        worker.start(deadline=40.0)
        try:
            process = worker.process
            assert process is not None
            store = DeadLetterStore(policy_redis())
            policy_redis().lpush("default", b"\xffnot a kombu message")

            def settled() -> bool:
                return store.total() >= 1 or process.poll() is not None

            poll(settled, deadline=30, what="the poison item quarantined (or the worker dead)")
            assert process.poll() is None, (
                "the worker died on a poison item:\n" + worker.log.read_text()[-2000:]
            )
            assert "poison message" in store.latest(1)[0].reason
            token = uuid.uuid4().hex
            result = client().send_task("bulwark.ping", args=[token])
            assert result.get(timeout=30)["token"] == token
        finally:
            worker.stop()
