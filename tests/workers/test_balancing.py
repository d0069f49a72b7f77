"""Balanced tasks on real parts: a real redis-server, real workers on the shard queues.

The router picks a shard from a snapshot refreshed in the background (never a Redis
call per message): least backlog sends new work to the emptier shard, an open breaker
on one shard moves new work to the other, and consistent hashing keeps every entry of
one account on one shard, in order, across worker restarts.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
import redis

from policies import keys
from policies.breaker import BreakerConfig, CircuitBreaker, RedisBreakerStore
from policies.errors import PolicyConfigError
from policies.routing import Balance, choose
from tests.balanced_app import EXPORTS, LEDGER, REPORTS, app
from tests.conftest import StartWorker
from tests.kit import ROOT, child_env, poll
from workers import balancing
from workers.client import client


@pytest.fixture
def router(r: redis.Redis) -> Iterator[balancing.Router]:
    router = balancing.router()
    router.refresh_now()
    yield router


def commands_run(r: redis.Redis) -> int:
    """Commands the server has run so far (INFO commandstats)."""
    return sum(int(v["calls"]) for v in r.info("commandstats").values())


def sent_to(
    router: balancing.Router, name: str, args: list[object], kwargs: dict[str, object] | None = None
) -> str:
    queue = router.queue_for(name, args, kwargs or {})
    assert queue is not None
    return queue


def test_least_backlog_sends_new_work_to_the_emptier_shard(
    r: redis.Redis, router: balancing.Router
) -> None:
    producer = client()
    for i in range(30):  # nobody consumes: reports.0 holds 30
        producer.send_task("reports.render", args=[f"r{i}"], queue="reports.0")
    sent_to(router, "reports.render", ["first"])  # chosen before any snapshot of its targets
    router.refresh_now()
    assert (router.state.backlog["reports.0"], router.state.backlog["reports.1"]) == (30, 0)
    before = commands_run(r)
    picks = {sent_to(router, "reports.render", ["x"]) for _ in range(1000)}
    assert picks == {"reports.1"}
    # No Redis call per message: at most the snapshot thread's one read meanwhile.
    assert commands_run(r) - before < 100


def test_each_message_is_routed_once(r: redis.Redis) -> None:
    """Round robin over two queues: each gets every other message (the producer routes a
    message before its authorization check and Celery again as it sends: one choice)."""
    producer = client()
    for i in range(10):
        producer.send_task("exports.write", args=[f"e{i}"])
    assert [r.llen(q) for q in EXPORTS] == [5, 5]
    producer.send_task("exports.write", args=["pinned"], queue="exports.1")
    assert [r.llen(q) for q in EXPORTS] == [5, 6]  # a queue given is a queue kept


def test_an_open_breaker_on_one_shard_moves_new_work_to_the_other(
    r: redis.Redis, router: balancing.Router
) -> None:
    CircuitBreaker("reports.1", BreakerConfig(), RedisBreakerStore(r)).force_open()
    sent_to(router, "reports.render", ["first"])
    router.refresh_now()
    assert router.state.blocked == {"reports.1"}
    assert {sent_to(router, "reports.render", ["x"]) for _ in range(20)} == {"reports.0"}


def test_consistent_hashing_keeps_an_account_on_one_shard_across_restarts(
    r: redis.Redis, start_worker: StartWorker
) -> None:
    accounts = [f"acct-{i}" for i in range(12)]

    def run_round(first: int) -> None:
        # One process per shard: the entries of one account run one after another.
        workers = [start_worker([shard], name=f"ledger{first}-{shard[-1]}", concurrency=1,
                                app="tests.balanced_app")
                   for shard in LEDGER]  # fmt: skip
        producer = client()
        for n in range(first, first + 5):
            for account in accounts:
                producer.send_task("ledger.post", kwargs={"account": account, "amount_cents": n})
        poll(lambda: all(r.llen(keys.key("test", "ledger", a)) == first + 5 for a in accounts),
             deadline=30, what="every entry posted")  # fmt: skip
        for worker in workers:
            worker.kill()

    run_round(0)
    run_round(5)  # new worker processes on the same shards
    shards_used = set()
    for account in accounts:
        entries = [e.decode() for e in r.lrange(keys.key("test", "ledger", account), 0, -1)]
        shards = {e.split(":")[0] for e in entries}
        assert len(shards) == 1, f"{account} posted on {shards}"
        assert [int(e.split(":")[1]) for e in entries] == list(range(10)), "in order"
        shards_used |= shards
    assert shards_used == set(LEDGER), "the accounts spread over both shards"


def test_a_key_that_is_not_an_argument_fails_at_declaration() -> None:
    with pytest.raises(PolicyConfigError, match="'customer' is not one of its arguments"):
        app.task(name="ledger.bad", balance=Balance(strategy="consistent_hash",
                 targets=LEDGER, key="customer"))(lambda account: None)  # fmt: skip
    with pytest.raises(PolicyConfigError, match="needs name="):
        app.task(balance=Balance(strategy="round_robin", targets=REPORTS))(lambda: None)


def test_a_resilient_task_may_be_balanced() -> None:
    """`balance=` sits beside the policy options of a ResilientTask (the README's example):
    tests.balanced_app declares `ledger.check` so, and imported without an error."""
    assert balancing.declared()["ledger.check"].targets == LEDGER


#: A producer that imports the client and nothing that declares a balanced task.
PRODUCER = """
import sys
from workers.client import client
producer = client()
for i in range(20):
    producer.send_task("ledger.post", kwargs={"account": f"acct-{i}", "amount_cents": i})
assert "tests.balanced_app" not in sys.modules
"""


def test_a_producer_that_never_imported_the_task_routes_it_by_name(
    r: redis.Redis, redis_url: str, start_worker: StartWorker
) -> None:
    # A worker of the balanced app publishes what it declares as it starts (it serves
    # another queue: the ledger entries stay queued, to be looked at).
    start_worker(["exports.0"], name="publisher", app="tests.balanced_app")
    found, problems = balancing.published(r)
    assert found["ledger.post"] == balancing.declared()["ledger.post"] and not problems
    r.hset(balancing.DECLARED_KEY, "bad.task", "[")  # anyone who may write there could

    done = subprocess.run([sys.executable, "-c", PRODUCER], env=child_env(redis_url), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (
        done.stderr.count("published balance of 'bad.task' skipped: declaration is not JSON") == 1
    )

    balance = balancing.declared()["ledger.post"]
    placed = {}
    for shard in LEDGER:
        for raw in r.lrange(shard, 0, -1):
            _, kwargs, _ = json.loads(base64.b64decode(json.loads(raw)["body"]))
            placed[kwargs["account"]] = shard
    assert r.llen("default") == 0, "none fell through to the default queue"
    assert placed == {f"acct-{i}": choose(balance, turn=0, key=f"acct-{i}") for i in range(20)}
    assert set(placed.values()) == set(LEDGER)


def test_the_key_hashes_alike_by_position_or_by_name(router: balancing.Router) -> None:
    """`ledger.post(self, account, amount_cents)` (bound): `account` is position 0 of what a
    producer sends; given either way, an account goes to one shard."""
    assert balancing.declared()["ledger.post"].key_position == 0
    for i in range(20):
        by_name = sent_to(router, "ledger.post", [], {"account": f"a{i}", "amount_cents": 1})
        assert sent_to(router, "ledger.post", [f"a{i}", 1]) == by_name
