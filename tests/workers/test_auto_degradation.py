"""Services degrade when their breaker opens and recover stepwise, with measured recovery."""

from __future__ import annotations

import time

import pytest
import redis

from policies import events
from policies.degradation.store import Level
from tests.kit import poll
from workers import listeners
from workers.autodegrade import observe_services
from workers.resources import policy

pytestmark = pytest.mark.integration


@pytest.fixture
def catalogue(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    monkeypatch.setenv("BULWARK_DEGRADATION_RECOVERY_STEP", "0.2")
    import tasks.policies  # noqa: F401  (declares payments)


class TestAutoDegradation:
    """Breaker open -> degraded at once; healthy again -> back to full one step at a time."""

    def test_breaker_transition_degrades_then_ticks_recover(
        self, r: redis.Redis, catalogue: None
    ) -> None:
        listeners.ensure()
        seen: list[events.Event] = []
        events.default_emitter.subscribe(seen.append)
        try:
            service = policy("service", "payments")
            breaker = policy("breaker", "payments")
            opened = time.monotonic()
            breaker.force_open()
            # The transition event alone moved the service: no tick has run.
            assert service.snapshot().level == Level.degraded
            breaker.reset()
            poll(
                lambda: observe_services() is not None and service.snapshot().level == Level.full,
                deadline=10,
                what="stepwise recovery to full",
            )
            took = time.monotonic() - opened
        finally:
            events.default_emitter.unsubscribe(seen.append)
        changes = [e for e in seen if isinstance(e, events.DegradationChanged)]
        assert [(c.from_level, c.to_level) for c in changes] == [
            ("full", "degraded"),
            ("degraded", "full"),
        ]
        (recovered,) = [e for e in seen if isinstance(e, events.Recovered)]
        # Measured by Redis TIME from leaving full to returning: at least one recovery step,
        # at most the time this test watched it take.
        assert 0.2 <= recovered.duration <= took + 0.05
        assert service.snapshot().last_recovery == pytest.approx(recovered.duration)
