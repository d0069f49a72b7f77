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


ARGS = [[], {}, [[]], {"a": []}, "ünïcødé ✓ \u0000", None, 0, 1.5, True, -(2**53)]
KWARGS = {"empty": [], "nested": {"x": [{}], "y": {}}, "text": "日本"}


class TestRoundTrip:
    """Arguments come back exactly as given: no [] turned into {}, unicode intact."""

    def test_args_and_kwargs_round_trip(self, r: redis.Redis) -> None:
        store = DeadLetterStore(r)
        added = store.add(DeadLetter(task_name="t", reason="r", args=ARGS, kwargs=KWARGS))
        (latest,) = store.latest()
        got = store.get(added.id)
        assert got is not None
        for letter in (latest, got):
            assert letter.args == ARGS and letter.kwargs == KWARGS
            assert type(letter.args[0]) is list and type(letter.args[1]) is dict
            assert letter.dead_at == pytest.approx(added.dead_at)

    def test_an_unreadable_entry_is_shown_not_raised(self, r: redis.Redis) -> None:
        store = DeadLetterStore(r)
        letter = store.add(DeadLetter(task_name="t", reason="r"))
        r.hset(store._entries, letter.id, "{not json")
        (shown,) = store.latest()
        assert shown.task_name == "<unreadable entry>"
        assert shown.reason.startswith("the stored entry does not parse")
