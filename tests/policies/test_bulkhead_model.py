"""The memory bulkhead store against a reference model, under random acquire/release/renew/time."""

from __future__ import annotations

import fakeredis
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from policies.bulkhead.store import BulkheadStore, MemoryBulkheadStore, RedisBulkheadStore
from policies.clock import FakeClock

LIMIT, TTL = 3, 1.0
holders = st.sampled_from([f"h{i}" for i in range(6)])


class LeaseModel(RuleBasedStateMachine):
    """Reference: a dict holder -> expiry; a lease is live while its expiry is after now."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.store: BulkheadStore = MemoryBulkheadStore(self.clock)
        self.leases: dict[str, float] = {}
        self.ttl = TTL

    def live(self) -> dict[str, float]:
        return {h: e for h, e in self.leases.items() if e > self.clock.now}

    @rule(holder=holders)
    def acquire(self, holder: str) -> None:
        self.leases = self.live()
        granted = holder in self.leases or len(self.leases) < LIMIT
        if granted:
            self.leases[holder] = self.clock.now + self.ttl
        outcome = self.store.acquire("m", holder, LIMIT, self.ttl)
        assert (outcome.ok, outcome.in_use) == (granted, len(self.leases))
        assert outcome.ok or 0 <= outcome.retry_after <= self.ttl  # the Bulkhead floors it

    @rule(holder=holders)
    def release(self, holder: str) -> None:
        released = holder in self.live()
        self.leases.pop(holder, None)
        self.leases = self.live()
        outcome = self.store.release("m", holder)
        assert (outcome.ok, outcome.in_use) == (released, len(self.leases))

    @rule(holder=holders)
    def renew(self, holder: str) -> None:
        renewed = holder in self.live()
        if renewed:
            self.leases[holder] = self.clock.now + self.ttl
        else:
            self.leases.pop(holder, None)
        outcome = self.store.renew("m", holder, self.ttl)
        assert (outcome.ok, outcome.in_use) == (renewed, len(self.live()))

    @rule(seconds=st.sampled_from([0.0, TTL / 4, TTL / 2, TTL, 2 * TTL]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @invariant()
    def same_live_holders_never_over_limit(self) -> None:
        state = self.store.state("m")
        assert set(state.holders) == set(self.live())
        assert len(state.holders) <= LIMIT


LeaseModel.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestLeaseModel = LeaseModel.TestCase
TestLeaseModel.__doc__ = "The memory store matches the lease model and never exceeds the limit."


class ScriptModel(LeaseModel):
    """The Lua scripts on fakeredis (real time: no time steps, leases outlive the run)."""

    def __init__(self) -> None:
        super().__init__()
        self.ttl = 600.0
        self.store = RedisBulkheadStore(fakeredis.FakeRedis(server=fakeredis.FakeServer()))

    def advance(self, seconds: float) -> None:  # not a rule here: Redis time is real
        raise AssertionError("unused")


ScriptModel.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
TestScriptModel = ScriptModel.TestCase
TestScriptModel.__doc__ = "The Lua scripts give the same answers as the lease model."
