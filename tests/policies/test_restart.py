"""The restart back-off and crash-loop rule of the process supervisor."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.errors import PolicyConfigError
from policies.restart import RestartPolicy

POLICY = RestartPolicy(base_delay=1.0, max_delay=30.0, loop_restarts=5, loop_window=60.0)
TIMES = st.lists(st.floats(min_value=0.0, max_value=1000.0, allow_nan=False), max_size=30)


class TestBackoff:
    """The delay doubles with each crash inside the window, from the base up to the cap."""

    def test_doubles_then_caps(self) -> None:
        crashes: list[float] = []
        delays = []
        for at in range(8):
            crashes.append(float(at))
            delays.append(POLICY.delay(crashes, float(at)))
        assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]

    def test_old_crashes_are_forgiven(self) -> None:
        assert POLICY.delay([0.0, 1.0, 2.0, 100.0], 100.0) == 1.0

    @given(crashes=TIMES, now=st.floats(min_value=0.0, max_value=1000.0))
    def test_bounded_and_monotone(self, crashes: list[float], now: float) -> None:
        delay = POLICY.delay(crashes, now)
        assert POLICY.base_delay <= delay <= POLICY.max_delay
        assert POLICY.delay([*crashes, now], now) >= delay, "one more crash never waits less"


class TestCrashLoop:
    """`loop_restarts` crashes inside `loop_window` seconds make a crash loop."""

    def test_five_in_a_minute(self) -> None:
        assert not POLICY.looping([0.0, 10.0, 20.0, 30.0], 30.0)
        assert POLICY.looping([0.0, 10.0, 20.0, 30.0, 40.0], 40.0)
        assert not POLICY.looping([0.0, 10.0, 20.0, 30.0, 40.0], 70.0), "the window moved on"

    @given(crashes=TIMES, now=st.floats(min_value=0.0, max_value=1000.0))
    def test_looping_is_recent_at_least_n(self, crashes: list[float], now: float) -> None:
        recent = [c for c in crashes if now - 60.0 < c <= now]
        assert POLICY.looping(crashes, now) == (len(recent) >= 5)

    @pytest.mark.parametrize(
        "options",
        [{"base_delay": 0.0}, {"base_delay": 5.0, "max_delay": 1.0}, {"loop_restarts": 0}],
    )
    def test_bad_values_are_refused(self, options: dict[str, float]) -> None:
        with pytest.raises(PolicyConfigError):
            RestartPolicy(**options)  # type: ignore[arg-type]
