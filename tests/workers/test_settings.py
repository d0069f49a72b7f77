"""Settings: the specification's defaults, and bad values named at start."""

from __future__ import annotations

import pytest

from workers.settings import Settings, SettingsError, describe, get_settings, unknown_variables


class TestDefaults:
    """With an empty environment the specification's defaults apply."""

    def test_spec_defaults(self) -> None:
        s = Settings.from_env({})
        assert s.resilience.breaker_failure_threshold == 5
        assert s.resilience.breaker_timeout == 30.0
        assert s.resilience.breaker_success_threshold == 3
        assert s.resilience.retry_max_attempts == 3
        assert s.resilience.retry_base_delay == 0.1
        assert s.resilience.retry_max_delay == 30.0
        assert s.resilience.bulkhead_max_concurrent == 10
        assert s.resilience.degradation_enabled is True
        assert s.observability.health_check_interval == 30.0
        assert s.observability.metrics_interval == 15.0
        assert s.observability.log_level == "info"
        assert s.observability.log_json is True

    def test_broker_and_backend_default_to_redis_url(self) -> None:
        s = Settings.from_env({"REDIS_URL": "redis://10.0.0.9:6380/2"})
        assert s.broker == s.backend == "redis://10.0.0.9:6380/2"

    def test_values_are_parsed(self) -> None:
        s = Settings.from_env(
            {
                "BULWARK_BREAKER_TIMEOUT": "2.5",
                "BULWARK_DEGRADATION_ENABLED": "off",
                "BULWARK_QUEUES": "billing, search",
                "BULWARK_LOG_LEVEL": "DEBUG",
            }
        )
        assert s.resilience.breaker_timeout == 2.5
        assert s.resilience.degradation_enabled is False
        assert s.scaling.queues == ("billing", "search")
        assert s.observability.log_level == "debug"
        assert s.all_queues[:2] == ("billing", "search")
        assert {"default", "alerts", "deadletter"} <= set(s.all_queues)


class TestErrors:
    """A bad value fails naming the variable and what it accepts."""

    @pytest.mark.parametrize(
        ("name", "value", "accepts"),
        [
            ("BULWARK_BREAKER_FAILURE_THRESHOLD", "0", "whole number >= 1"),
            ("BULWARK_BREAKER_TIMEOUT", "soon", "number of seconds > 0"),
            ("BULWARK_RETRY_BASE_DELAY", "-1", "number of seconds > 0"),
            ("BULWARK_RETRY_MAX_DELAY", "nan", "number of seconds > 0"),
            ("BULWARK_DEGRADATION_ENABLED", "maybe", "true/false"),
            ("BULWARK_LOG_LEVEL", "loud", "one of debug, info"),
            ("BULWARK_QUEUES", "Payments", "lower-case names"),
            ("REDIS_URL", "localhost:6379", "redis://"),
        ],
    )
    def test_bad_value_is_named(self, name: str, value: str, accepts: str) -> None:
        with pytest.raises(SettingsError) as info:
            Settings.from_env({name: value})
        message = str(info.value)
        assert name in message
        assert accepts in message
        assert repr(value) in message

    def test_every_problem_is_reported_at_once(self) -> None:
        with pytest.raises(SettingsError) as info:
            Settings.from_env({"BULWARK_BREAKER_TIMEOUT": "x", "BULWARK_RETRY_MAX_ATTEMPTS": "y"})
        assert len(info.value.problems) == 2

    def test_secret_values_are_not_echoed(self) -> None:
        with pytest.raises(SettingsError) as info:
            Settings.from_env({"BULWARK_FLOWER_PASSWORD": "   "})
        assert "BULWARK_FLOWER_PASSWORD=<secret>" in str(info.value)

    def test_visibility_timeout_must_cover_the_longest_countdown(self) -> None:
        with pytest.raises(SettingsError, match="BULWARK_VISIBILITY_TIMEOUT"):
            Settings.from_env({"BULWARK_VISIBILITY_TIMEOUT": "60", "BULWARK_TASK_TIME_LIMIT": "30"})

    def test_fixed_queue_names_are_reserved(self) -> None:
        with pytest.raises(SettingsError, match="deadletter"):
            Settings.from_env({"BULWARK_QUEUES": "payments,deadletter"})


def test_every_setting_is_described() -> None:
    rows = list(describe())
    names = [row[1] for row in rows]
    assert len(names) == len(set(names))
    assert "BULWARK_BREAKER_FAILURE_THRESHOLD" in names
    assert all(row[3] for row in rows), "every setting says what it accepts"


class TestHostileSettings:
    """Ports are ports, long bad values are clipped, unknown variables are named."""

    @pytest.mark.parametrize("port", ["0", "65536", "-1", "99999999999999999999"])
    def test_ports_are_checked(self, port: str) -> None:
        with pytest.raises(SettingsError, match=r"BULWARK_FLOWER_PORT.*a TCP port from 1 to 65535"):
            Settings.from_env({"BULWARK_FLOWER_PORT": port})
        assert Settings.from_env({"BULWARK_HTTP_PORT": "0"}).observability.http_port == 0

    def test_a_long_bad_value_is_clipped(self) -> None:
        with pytest.raises(SettingsError) as bad:
            Settings.from_env({"BULWARK_DEFER_MAX": "x" * 100_000})
        assert "(100000 characters)" in str(bad.value) and len(str(bad.value)) < 400

    def test_unknown_variables_name_the_closest(self) -> None:
        found = unknown_variables(
            {"BULWARK_BREAKER_TIMOUT": "3", "BULWARK_NOTHING_LIKE_IT": "1", "BULWARK_QUEUES": "a"}
        )
        assert found == [
            "BULWARK_BREAKER_TIMOUT is not a Bulwark setting and is ignored; "
            "did you mean BULWARK_BREAKER_TIMEOUT?",
            "BULWARK_NOTHING_LIKE_IT is not a Bulwark setting and is ignored",
        ]

    def test_get_settings_warns_at_start(
        self, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        monkeypatch.setenv("BULWARK_DEFER_MAXX", "3")
        get_settings.cache_clear()
        with caplog.at_level("WARNING", logger="workers.settings"):
            get_settings()
        assert "did you mean BULWARK_DEFER_MAX?" in caplog.text
