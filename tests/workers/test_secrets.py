"""Secrets: a value that never shows, read from a variable or a 0600 file, put into the Redis
URLs, masked in every log line; the production profile refuses what is only fit for
development."""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from tests.kit import ROOT
from workers.ops import flower
from workers.ops.supervisor import plan, proc
from workers.secrets import (
    MASKED,
    Secret,
    SecretFileError,
    hide_password,
    plaintext_remote,
    read_secret_file,
    url_password,
    with_password,
)
from workers.settings import (
    Settings,
    SettingsError,
    describe,
    get_settings,
    known_variables,
    secret_variables,
    unknown_variables,
)
from workers.telemetry import redact as redaction
from workers.telemetry.alerts.dispatch import build_sinks
from workers.telemetry.logs import configure

SECRET_SETTINGS = (
    "BULWARK_FLOWER_PASSWORD",
    "BULWARK_ALERT_WEBHOOK_SECRET",
    "BULWARK_ALERT_SMTP_PASSWORD",
    "BULWARK_REDIS_PASSWORD",
)

#: Text a secret may be made of (no '*': a mask is made of those).
SECRET_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="*"),
    min_size=1,
    max_size=40,
).filter(lambda s: s.strip() == s and s.strip())

WriteSecret = Callable[..., Path]


def redis_kwargs(url: str) -> dict[str, Any]:
    """What redis-py makes of a URL (the client every Bulwark process builds)."""
    parsed: dict[str, Any] = redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
    return parsed


@pytest.fixture
def secret_file(tmp_path: Path) -> WriteSecret:
    """Write a secret file (mode 0600 unless told) and return its path."""

    def write(content: str | bytes, *, mode: int = 0o600, name: str = "secret") -> Path:
        path = tmp_path / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        path.chmod(mode)
        return path

    return write


@pytest.fixture(autouse=True)
def _forget_known_secrets() -> Iterator[None]:
    yield
    redaction.forget_secrets()


class TestSecret:
    """A Secret shows '********' in every text form; `.reveal()` is the only way to the value."""

    @given(SECRET_TEXT)
    def test_every_text_form_is_the_mask(self, value: str) -> None:
        def shown(s: Secret) -> list[str]:
            texts = [str(s), repr(s), f"{s}", f"{s!r}", f"{s:>20}", "%s" % s, str.format("{}", s)]  # noqa: UP031
            return [*texts, json.dumps(s), json.dumps({"k": s}), str([s]), s + "", "".join([s])]

        s = Secret(value)
        assert s.reveal() == value
        # Every form is the same text whatever the value: nothing of it shows.
        assert shown(s) == shown(Secret("another value"))
        assert all(MASKED in text for text in shown(s))

    def test_equality_is_by_value_and_never_with_plain_text(self) -> None:
        assert Secret("a") == Secret("a")
        assert Secret("a") != Secret("b")
        assert Secret("a") != "a"
        assert Secret("a") != MASKED
        assert not (Secret("a") == MASKED)  # noqa: SIM201
        assert len({Secret("a"), Secret("a"), Secret("b")}) == 2

    def test_copied_not_pickled_not_changed(self) -> None:
        s = Secret("v")
        assert copy.copy(s) is s and copy.deepcopy(s) is s
        with pytest.raises(TypeError, match="not pickled"):
            pickle.dumps(s)
        with pytest.raises(AttributeError):
            s._value = "other"
        assert Secret(s).reveal() == "v"
        with pytest.raises(TypeError):
            Secret(b"bytes")  # type: ignore[arg-type]


class TestSecretFiles:
    """`<NAME>_FILE` names a file holding the secret; refused when unsafe, named when wrong."""

    @pytest.mark.parametrize("name", SECRET_SETTINGS)
    def test_every_secret_setting_reads_its_file(self, name: str, secret_file: WriteSecret) -> None:
        path = secret_file("from-the-file\n")
        s = Settings.from_env({f"{name}_FILE": str(path)})
        values = [
            s.redis_password,
            s.security.flower_password,
            s.security.alert_webhook_secret,
            s.security.alert_smtp_password,
        ]
        found = [v for v in values if v is not None]
        assert len(found) == 1 and isinstance(found[0], Secret)
        assert found[0].reveal() == "from-the-file"

    def test_the_variable_holds_a_secret_too(self) -> None:
        s = Settings.from_env({"BULWARK_ALERT_SMTP_PASSWORD": "smtp-pw"})
        assert s.security.alert_smtp_password == Secret("smtp-pw")

    @pytest.mark.parametrize(
        ("content", "value"),
        [("pw\n", "pw"), ("pw\r\n", "pw"), ("pw", "pw"), ("p w\n", "p w"), ("pé\n", "pé")],
    )
    def test_trailing_newline_is_stripped(
        self, content: str, value: str, secret_file: WriteSecret
    ) -> None:
        assert read_secret_file(secret_file(content)) == value

    def test_both_set_is_refused_naming_both(self, secret_file: WriteSecret) -> None:
        path = secret_file("one")
        with pytest.raises(SettingsError) as refused:
            Settings.from_env(
                {"BULWARK_FLOWER_PASSWORD": "two", "BULWARK_FLOWER_PASSWORD_FILE": str(path)}
            )
        message = str(refused.value)
        assert "BULWARK_FLOWER_PASSWORD and BULWARK_FLOWER_PASSWORD_FILE are both set" in message
        assert "one" not in message.replace("one of them", "") and "two" not in message

    def test_unreadable_file_names_variable_and_path(self, tmp_path: Path) -> None:
        missing = tmp_path / "nope"
        with pytest.raises(SettingsError) as refused:
            Settings.from_env({"BULWARK_ALERT_WEBHOOK_SECRET_FILE": str(missing)})
        message = str(refused.value)
        assert "BULWARK_ALERT_WEBHOOK_SECRET_FILE" in message and str(missing) in message
        assert "No such file" in message

    @pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
    def test_file_without_read_permission(self, secret_file: WriteSecret) -> None:
        path = secret_file("hidden-content", mode=0o000)
        with pytest.raises(SettingsError) as refused:
            Settings.from_env({"BULWARK_REDIS_PASSWORD_FILE": str(path)})
        assert "Permission denied" in str(refused.value) and str(path) in str(refused.value)
        assert "hidden-content" not in str(refused.value)

    @pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o610])
    def test_group_or_other_access_is_refused(self, mode: int, secret_file: WriteSecret) -> None:
        path = secret_file("s3cr3t-content", mode=mode)
        with pytest.raises(SettingsError) as refused:
            Settings.from_env({"BULWARK_ALERT_SMTP_PASSWORD_FILE": str(path)})
        message = str(refused.value)
        assert "BULWARK_ALERT_SMTP_PASSWORD_FILE" in message
        assert f"secret file {path} is readable by group or others (mode {mode:o})" in message
        assert f"chmod 600 {path}" in message
        assert "s3cr3t-content" not in message

    @pytest.mark.parametrize("mode", [0o600, 0o400])
    def test_owner_only_is_accepted(self, mode: int, secret_file: WriteSecret) -> None:
        path = secret_file("ok", mode=mode)
        assert Settings.from_env(
            {"BULWARK_FLOWER_PASSWORD_FILE": str(path)}
        ).security.flower_password

    def test_not_a_file_too_big_or_not_text(self, tmp_path: Path, secret_file: WriteSecret) -> None:
        folder = tmp_path / "folder"
        folder.mkdir(mode=0o700)
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo, 0o600)
        for path, why in [
            (folder, "not a regular file"),
            (fifo, "not a regular file"),
            (secret_file("x" * 70_000, name="big"), "a secret file holds one value"),
            (secret_file(b"\xff\xfe", name="binary"), "not UTF-8 text"),
        ]:
            with pytest.raises(SecretFileError, match=why):
                read_secret_file(path)

    def test_empty_file_names_the_file_not_the_content(self, secret_file: WriteSecret) -> None:
        path = secret_file("  \n")
        with pytest.raises(SettingsError) as refused:
            Settings.from_env({"BULWARK_FLOWER_PASSWORD_FILE": str(path)})
        message = f"BULWARK_FLOWER_PASSWORD_FILE ({path}) does not hold a non-empty string"
        assert str(refused.value).endswith(message)

    def test_file_names_are_known_variables(self) -> None:
        assert secret_variables() == frozenset(SECRET_SETTINGS)
        assert {f"{n}_FILE" for n in SECRET_SETTINGS} <= known_variables()
        assert unknown_variables({f"{n}_FILE": "/x" for n in SECRET_SETTINGS}) == []
        assert unknown_variables({"BULWARK_FLOWER_PASSWORD_FIL": "/x"}) == [
            "BULWARK_FLOWER_PASSWORD_FIL is not a Bulwark setting and is ignored; "
            "did you mean BULWARK_FLOWER_PASSWORD_FILE?"
        ]

    def test_described_with_their_file_and_no_value(self) -> None:
        rows = {row[1]: row for row in describe()}
        for name in SECRET_SETTINGS:
            assert f"{name}_FILE" in rows[name][4]
            assert rows[name][2] == "(unset)"


class TestRedisPassword:
    """BULWARK_REDIS_PASSWORD goes into each Redis URL that names no password."""

    def test_into_every_url(self) -> None:
        s = Settings.from_env(
            {
                "BULWARK_REDIS_PASSWORD": "pw",
                "CELERY_BROKER_URL": "redis://10.0.0.2:6379/1",
                "CELERY_RESULT_BACKEND": "redis://:own@10.0.0.3:6379/2",
            }
        )
        assert s.redis_url == "redis://:pw@127.0.0.1:6379/0"
        assert s.broker == "redis://:pw@10.0.0.2:6379/1"
        assert s.backend == "redis://:own@10.0.0.3:6379/2", "a URL's own password is kept"

    def test_broker_and_backend_follow_redis_url(self) -> None:
        s = Settings.from_env(
            {"REDIS_URL": "redis://user@10.0.0.9:6380/2", "BULWARK_REDIS_PASSWORD": "pw"}
        )
        assert s.redis_url == s.broker == s.backend == "redis://user:pw@10.0.0.9:6380/2"

    def test_tls_and_unix_urls(self) -> None:
        tls = "rediss://h:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem"
        assert (
            with_password(tls, "p")
            == "rediss://:p@h:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem"
        )
        assert with_password("unix:///run/redis.sock?db=1", "p") == "unix://:p@/run/redis.sock?db=1"
        parsed = redis_kwargs(with_password("unix:///run/redis.sock?db=1", "p@:/"))
        assert parsed["password"] == "p@:/" and parsed["path"] == "/run/redis.sock"

    @given(SECRET_TEXT)
    def test_any_password_survives_the_url(self, password: str) -> None:
        url = with_password("redis://127.0.0.1:6379/0", password)
        assert url_password(url) == password
        assert redis_kwargs(url)["password"] == password
        assert password not in hide_password(url) or password in "redis://:***@127.0.0.1:6379/0"

    def test_repr_and_secret_values(self) -> None:
        s = Settings.from_env(
            {
                "BULWARK_REDIS_PASSWORD": "redis-pw-1",
                "CELERY_RESULT_BACKEND": "redis://:inline-pw-2@127.0.0.1/1",
                "BULWARK_FLOWER_PASSWORD": "flower-pw-3",
            }
        )
        shown = repr(s) + str(s)
        for value in ("redis-pw-1", "inline-pw-2", "flower-pw-3"):
            assert value not in shown
        assert "redis_url='redis://:***@127.0.0.1:6379/0'" in shown
        assert s.secret_values() == {"redis-pw-1", "inline-pw-2", "flower-pw-3"}


GOOD_PRODUCTION = {
    "BULWARK_PROFILE": "production",
    "BULWARK_FLOWER_PASSWORD": "flower-pw",
    "BULWARK_AUDIT_KEY_FILE": "/keys/audit.pem",
}


class TestProductionProfile:
    """BULWARK_PROFILE=production refuses, naming each, what only development may do."""

    def test_development_is_the_default_and_refuses_nothing(self) -> None:
        s = Settings.from_env({"BULWARK_SECURITY": "off", "REDIS_URL": "redis://10.1.1.1/0"})
        assert s.security.profile == "development" and not s.production
        assert s.production_problems() == []

    @pytest.mark.parametrize(
        "url",
        [
            "redis://127.0.0.1:6379/0",
            "redis://127.8.9.10/0",
            "redis://localhost:6379/0",
            "redis://[::1]:6379/0",
            "unix:///run/redis.sock",
            "rediss://redis.internal:6380/0?ssl_cert_reqs=required",
            "rediss://redis.internal:6380/0?ssl_cert_reqs=CERT_REQUIRED",
        ],
    )
    def test_safe_settings_pass(self, url: str) -> None:
        s = Settings.from_env({**GOOD_PRODUCTION, "REDIS_URL": url})
        assert s.production and s.security.flower_password == Secret("flower-pw")

    def test_each_problem_is_named_at_once(self) -> None:
        with pytest.raises(SettingsError) as refused:
            Settings.from_env(
                {
                    "BULWARK_PROFILE": "production",
                    "BULWARK_SECURITY": "off",
                    "REDIS_URL": "redis://10.0.0.5:6379/0",
                    "BULWARK_REDIS_PASSWORD": "never-shown",
                    "CELERY_BROKER_URL": "rediss://broker:6380/0?ssl_cert_reqs=none",
                    "CELERY_RESULT_BACKEND": "rediss://backend:6380/0?ssl_cert_reqs=optional",
                }
            )
        problems = refused.value.problems
        assert len(problems) == 6, problems
        text = "\n".join(problems)
        assert "refuses BULWARK_SECURITY=off" in text
        assert "REDIS_URL=redis://:***@10.0.0.5:6379/0: plain redis://" in text
        assert "CELERY_BROKER_URL=rediss://:***@broker:6380/0?ssl_cert_reqs=none" in text
        assert "ssl_cert_reqs=optional does not check" in text
        assert "needs BULWARK_FLOWER_PASSWORD (or BULWARK_FLOWER_PASSWORD_FILE)" in text
        assert "needs BULWARK_AUDIT_KEY_FILE" in text
        assert "never-shown" not in text

    @pytest.mark.parametrize(
        ("change", "named"),
        [
            ({"BULWARK_SECURITY": "off"}, "BULWARK_SECURITY=off"),
            ({"BULWARK_FLOWER_PASSWORD": ""}, "BULWARK_FLOWER_PASSWORD"),
            ({"BULWARK_AUDIT_KEY_FILE": ""}, "BULWARK_AUDIT_KEY_FILE"),
            ({"CELERY_BROKER_URL": "redis://broker/0"}, "CELERY_BROKER_URL"),
            ({"CELERY_RESULT_BACKEND": "redis://10.0.0.1/0"}, "CELERY_RESULT_BACKEND"),
        ],
    )
    def test_one_problem_is_enough(self, change: dict[str, str], named: str) -> None:
        with pytest.raises(SettingsError) as refused:
            Settings.from_env({**GOOD_PRODUCTION, **change})
        assert len(refused.value.problems) == 1 and named in refused.value.problems[0]

    def test_flower_password_from_its_file_counts(self, secret_file: WriteSecret) -> None:
        env = {**GOOD_PRODUCTION, "BULWARK_FLOWER_PASSWORD": ""}
        env["BULWARK_FLOWER_PASSWORD_FILE"] = str(secret_file("from-file"))
        assert Settings.from_env(env).security.flower_password == Secret("from-file")

    @given(
        st.ip_addresses().map(str),
        st.sampled_from(["redis", "rediss"]),
    )
    def test_plaintext_only_off_loopback(self, address: str, scheme: str) -> None:
        host = f"[{address}]" if ":" in address else address
        url = f"{scheme}://{host}:6379/0"
        loopback = address.startswith("127.") or address == "::1"
        assert plaintext_remote(url) is (scheme == "redis" and not loopback)


class TestMaskedInLogs:
    """The configured secrets are masked in every log line, wherever they appear."""

    def test_get_settings_registers_its_secrets(
        self, monkeypatch: pytest.MonkeyPatch, secret_file: WriteSecret
    ) -> None:
        monkeypatch.setenv("BULWARK_ALERT_WEBHOOK_SECRET_FILE", str(secret_file("hook-XYZ-1")))
        monkeypatch.setenv("BULWARK_REDIS_PASSWORD", "redis-XYZ-2")
        get_settings.cache_clear()
        get_settings()
        out = io.StringIO()
        configure(level="DEBUG", json_lines=True, stream=out)
        log = logging.getLogger("bulwark.test.secrets")
        log.info("plain hook-XYZ-1 and %s, in a word:xhook-XYZ-1", "redis-XYZ-2")
        log.warning("extras", extra={"detail": {"nested": ["hook-XYZ-1"]}, "note": "xhook-XYZ-1x"})
        try:
            raise RuntimeError("failed with 'hook-XYZ-1'")
        except RuntimeError:
            log.exception("boom")
        log.info("stack", stack_info=True, extra={"why": "redis-XYZ-2"})
        text = out.getvalue()
        assert "hook-XYZ-1" not in text and "redis-XYZ-2" not in text
        lines = [json.loads(line) for line in text.splitlines()]
        assert lines[0]["message"] == "plain *** and ***, in a word:x***"
        assert lines[1]["detail"] == {"nested": ["***"]} and lines[1]["note"] == "x***x"
        assert "RuntimeError: failed with '***'" in lines[2]["exception"]
        # the next settings read replaces what the last one registered
        monkeypatch.delenv("BULWARK_REDIS_PASSWORD")
        get_settings.cache_clear()
        get_settings()
        assert "redis-XYZ-2" in redaction.redact("redis-XYZ-2 hook-XYZ-1")

    def test_quoted_and_escaped_forms(self) -> None:
        redaction.remember_secrets("test", ['p@ss "w\'ord"é'])
        for text in [
            'p@ss "w\'ord"é',
            "redis://:p%40ss%20%22w%27ord%22%C3%A9@h",
            json.dumps({"v": 'p@ss "w\'ord"é'}),
            json.dumps({"v": 'p@ss "w\'ord"é'}, ensure_ascii=False),
            repr('p@ss "w\'ord"é'),
        ]:
            out = redaction.redact(text)
            assert "ord" not in out, (text, out)

    @given(
        st.lists(SECRET_TEXT, min_size=1, max_size=4),
        st.text(alphabet=st.sampled_from(list("ab:=/@ \"'xé-\n")), max_size=400),
        st.lists(st.integers(0, 400), max_size=6),
    )
    def test_no_known_secret_survives(self, secrets: list[str], filler: str, at: list[int]) -> None:
        text = filler
        for i, pos in enumerate(at):
            secret = secrets[i % len(secrets)]
            pos = min(pos, len(text))
            text = text[:pos] + secret + text[pos:]
        redaction.remember_secrets("test", secrets)
        out = redaction.redact(text)
        for secret in secrets:
            assert secret not in out, (secret, text, out)

    def test_a_secret_across_the_cut_is_masked_whole(self) -> None:
        secret = "cut-" + "s" * 3000  # longer than the look-ahead
        redaction.remember_secrets("test", [secret])
        for before in (redaction.MAX_SCAN - 10, redaction.MAX_SCAN - 2999, redaction.MAX_SCAN + 5):
            text = "a" * before + secret + "b" * 100_000
            out = redaction.redact(text)
            assert "cut-s" not in out and "sss" not in out, before
            assert out.endswith(
                f"... [{len(text) - redaction.MAX_SCAN} more characters not logged]"
            )
            assert len(out) <= redaction.MAX_SCAN + 60

    def test_megabyte_dense_with_a_short_secret(self) -> None:
        redaction.remember_secrets("test", ["ab", "b"])
        out = redaction.redact("ab" * 500_000)
        assert "b" not in out.split("...")[0] and len(out) < 2 * redaction.MAX_SCAN

    def test_forget(self) -> None:
        redaction.remember_secrets("a", ["one-secret"])
        redaction.remember_secrets("b", ["two-secret"])
        assert redaction.redact("one-secret two-secret") == "*** ***"
        redaction.forget_secrets("a")
        assert redaction.redact("one-secret two-secret") == "one-secret ***"
        redaction.forget_secrets()
        assert redaction.known_secret_count() == 0


class TestReaders:
    """Whatever needs the credential gets the value; nothing else sees it."""

    def test_alert_sinks_get_the_values(self) -> None:
        s = Settings.from_env(
            {
                "BULWARK_ALERT_WEBHOOK_URL": "http://127.0.0.1:1/hook",
                "BULWARK_ALERT_WEBHOOK_SECRET": "hmac-value",
                "BULWARK_ALERT_SMTP_HOST": "127.0.0.1",
                "BULWARK_ALERT_SMTP_PASSWORD": "smtp-value",
                "BULWARK_ALERT_EMAIL_TO": "ops@example.test",
            }
        )
        sinks = build_sinks(s)
        assert sinks["webhook"]._secret == "hmac-value"  # type: ignore[attr-defined]
        assert sinks["email"]._password == "smtp-value"  # type: ignore[attr-defined]

    def test_up_and_proc_give_flower_the_value(
        self, monkeypatch: pytest.MonkeyPatch, secret_file: WriteSecret
    ) -> None:
        path = secret_file("flower-value")
        s = Settings.from_env({"BULWARK_FLOWER_PASSWORD_FILE": str(path)})
        fleet = plan(s, ROOT / "Procfile", environ={})
        assert fleet.env["FLOWER_BASIC_AUTH"] == "admin:flower-value"
        assert not fleet.flower_password_generated
        monkeypatch.delenv("FLOWER_BASIC_AUTH", raising=False)
        seen: dict[str, str] = {}

        def execvpe(_file: str, _args: list[str], env: dict[str, str]) -> None:
            seen.update(env)

        monkeypatch.setattr(os, "execvpe", execvpe)
        proc(s, ROOT / "Procfile", "flower")
        assert seen["FLOWER_BASIC_AUTH"] == "admin:flower-value"

    def test_flower_basic_auth(self) -> None:
        s = Settings.from_env({"BULWARK_FLOWER_USER": "ops", "BULWARK_FLOWER_PASSWORD": "fp"})
        assert flower.basic_auth({}, s) == "ops:fp"
        assert flower.basic_auth({"FLOWER_BASIC_AUTH": "a:b"}, s) == "a:b"
        assert flower.basic_auth({}, Settings.from_env({})) is None
        assert flower.passwords("a:b:c,d:e,broken") == ["b:c", "e"]

    def test_flower_refuses_without_auth(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("FLOWER_BASIC_AUTH", raising=False)
        monkeypatch.setattr(flower, "configure", lambda: None)
        monkeypatch.setattr(flower, "celery_main", lambda: pytest.fail("Flower was started"))
        get_settings.cache_clear()
        with pytest.raises(SystemExit, match="Flower never runs without basic auth"):
            flower.main([])
