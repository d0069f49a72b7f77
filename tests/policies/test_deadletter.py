"""The dead-letter store on a real redis-server: kept with a server timestamp, trimmed
oldest first, counted for ever."""

from __future__ import annotations

import pytest
import redis

from policies.deadletter import DeadLetter, DeadLetterStore

pytestmark = pytest.mark.integration


class TestTrimming:
    """Past `max_entries` the oldest letters go; the total keeps counting."""

    def test_oldest_are_trimmed(self, r: redis.Redis) -> None:
        store = DeadLetterStore(r, max_entries=3)
        added = [store.add(DeadLetter(task_name="t", reason=f"r{i}")) for i in range(5)]
        assert (store.count(), store.total()) == (3, 5)
        kept = [letter.id for letter in store.latest(10)]
        assert kept == [a.id for a in reversed(added[2:])], "newest first, the two oldest gone"
        assert store.get(added[0].id) is None and store.get(added[1].id) is None
        assert r.hlen(store._entries) == 3, "trimmed from the hash too, not only the index"

    def test_each_letter_is_stamped_by_the_server(self, r: redis.Redis) -> None:
        letter = DeadLetterStore(r).add(DeadLetter(task_name="t", reason="r"))
        seconds, _micros = r.time()
        assert letter.dead_at is not None and abs(letter.dead_at - seconds) < 5
        stored = DeadLetterStore(r).get(letter.id)
        assert stored is not None and stored.dead_at == pytest.approx(letter.dead_at)
