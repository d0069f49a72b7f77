"""Anything on a queue: a real worker refuses what is malformed, keeps it with its reason,
runs every good task next to it exactly once, and never stops.

Each crafted message is signed as an authorized producer would sign it (when it can be
read at all), so that the checks past the signature are reached: these are the
messages of a trusted producer with a bug. Forged and tampered messages are
`tests/workers/test_security.py`'s."""

from __future__ import annotations

import base64
import copy
import json
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies import keys
from policies.deadletter import DeadLetterStore
from tests.conftest import StartWorker
from tests.kit import Worker, poll
from tests.signing import sign_envelope
from workers.client import client
from workers.envelope import RAW_KEEP
from workers.telemetry.http import wait_address

pytestmark = pytest.mark.integration

QUEUE = "default"
TOKENS = keys.key("diagnostics", "ping", "tokens")

Envelope = dict[str, Any]
Variant = Callable[[Envelope], bytes | Envelope]


@pytest.fixture
def template(r: redis.Redis) -> Envelope:
    """A real message as `client()` sends it (taken off the queue before any worker runs)."""
    client().send_task("bulwark.ping", args=["template"])
    raw = r.rpop(QUEUE)
    assert raw is not None
    return json.loads(raw)  # type: ignore[no-any-return]


def good(template: Envelope, token: str) -> Envelope:
    message = copy.deepcopy(template)
    task_id = str(uuid.uuid4())
    message["headers"].update(id=task_id, root_id=task_id, argsrepr=repr([token]))
    message["properties"].update(correlation_id=task_id, delivery_tag=str(uuid.uuid4()))
    message["body"] = encode_body([[token], {}, {"callbacks": None, "errbacks": None,
                                                 "chain": None, "chord": None}])  # fmt: skip
    return message


def encode_body(value: Any) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


def edit(path: str, value: Any = ..., *, body: Any = ...) -> Variant:
    """A variant that sets (or, with no value, deletes) one field of a good message."""

    def apply(message: Envelope) -> Envelope:
        if body is not ...:
            message["body"] = encode_body(body)
            return message
        *parents, last = path.split(".")
        node = message
        for part in parents:
            node = node[part]
        if value is ...:
            node.pop(last, None)
        else:
            node[last] = value
        return message

    return apply


def raw(data: bytes) -> Variant:
    return lambda message: data


FAR = (datetime.now(UTC) + timedelta(days=30)).isoformat()

#: (name, variant, what the dead letter's reason must say)
VARIANTS: list[tuple[str, Variant, str]] = [
    ("not json", raw(b"not json"), "not JSON"),
    ("empty", raw(b""), "not JSON"),
    ("not utf-8", raw(b"\xff\xfe\x00{garbage"), "not UTF-8"),
    ("json array", raw(b"[1, 2, 3]"), "a JSON list"),
    ("json string", raw(b'"a string"'), "a JSON str"),
    ("json null", raw(b"null"), "a JSON NoneType"),
    ("empty object", raw(b"{}"), "'body' missing"),
    ("deep nesting", raw(b"[" * 100_000), "not JSON"),
    ("oversized", raw(b"x" * (RAW_KEEP * 20)), "not JSON"),
    ("truncated", lambda m: json.dumps(m).encode()[:150], "not JSON"),
    ("no properties", edit("properties"), "'properties' missing"),
    ("properties a string", edit("properties", "x"), "'properties' is str"),
    ("headers a list", edit("headers", []), "'headers' is list"),
    ("no body", edit("body"), "'body' missing"),
    ("content-type a number", edit("content-type", 5), "'content-type' is int"),
    ("no delivery tag", edit("properties.delivery_tag"), "delivery_tag"),
    ("no delivery info", edit("properties.delivery_info"), "delivery_info"),
    ("routing key a number", edit("properties.delivery_info.routing_key", 5), "routing_key"),
    ("priority a word", edit("properties.priority", "high"), "priority"),
    ("body not base64", edit("body", "@@@ not base64 @@@"), "not base64"),
    ("unknown body encoding", edit("properties.body_encoding", "rot13"), "body_encoding"),
    ("no id", edit("headers.id"), "'id'"),
    ("id a number", edit("headers.id", 5), "'id'"),
    ("task null", edit("headers.task", None), "'task'"),
    ("timelimit a word", edit("headers.timelimit", "abc"), "'timelimit'"),
    ("timelimit three long", edit("headers.timelimit", [1, 2, 3]), "'timelimit'"),
    ("eta not a time", edit("headers.eta", "tomorrow"), "'eta'"),
    ("expires a number", edit("headers.expires", 12), "'expires'"),
    ("retries a word", edit("headers.retries", "x"), "'retries'"),
    ("retries negative", edit("headers.retries", -1), "'retries'"),
    ("argsrepr an object", edit("headers.argsrepr", {"a": 1}), "'argsrepr'"),
    ("reply_to a list", edit("properties.reply_to", []), "'reply_to'"),
    ("body an object", edit("", body={"a": 1}), "task body"),
    ("body two long", edit("", body=[[], {}]), "task body"),
    ("args a word", edit("", body=["x", {}, {}]), "task args"),
    ("kwargs a list", edit("", body=[[], [], {}]), "task kwargs"),
    ("callbacks a word", edit("", body=[[], {}, {"callbacks": "x"}]), "'callbacks'"),
    (
        "json body that is not json",
        edit("body", base64.b64encode(b"{{{").decode()),
        "not valid JSON",
    ),
    ("pickle", edit("content-type", "application/x-python-serialize"), "only json is accepted"),
    (
        "lone surrogate body",
        lambda m: {
            **m,
            "body": "\ud800",
            "properties": {k: v for k, v in m["properties"].items() if k != "body_encoding"},
        },
        "not valid JSON",
    ),
    ("deeper than kombu takes", edit("headers.x", json.loads("[" * 900 + "]" * 900)), "nested"),
    (
        "a kombu type hook that raises",
        edit("headers.x", {"__type__": "uuid", "__value__": 1}),
        "not JSON",
    ),
    ("retries as text", edit("headers.retries", "3"), "'retries'"),
    ("unknown task", edit("headers.task", "nosuch.task"), "unknown task name"),
    ("eta beyond the horizon", edit("headers.eta", FAR), "beyond what a worker may hold"),
    (
        "duplicated key, the last one bad",
        lambda m: (json.dumps(m)[:-1] + ', "headers": []}').encode(),
        "'headers' is list",
    ),
]


def push(r: redis.Redis, item: bytes | Envelope) -> None:
    r.lpush(QUEUE, item if isinstance(item, bytes) else json.dumps(sign_envelope(item, QUEUE)))


def ready(url: str) -> int:
    with urllib.request.urlopen(url + "/readyz", timeout=10) as response:
        return int(response.status)


@pytest.fixture
def worker(r: redis.Redis, start_worker: StartWorker, template: Envelope) -> Iterator[Worker]:
    yield start_worker([QUEUE], name="hostile", concurrency=2)


def settle(r: redis.Redis, *, ran: int, refused: int) -> None:
    """Wait until every sent message ran or was dead-lettered; the queue is then empty."""
    store = DeadLetterStore(r)
    poll(
        lambda: r.llen(TOKENS) >= ran and store.total() >= refused,
        deadline=60,
        what=f"{ran} tasks run and {refused} messages dead-lettered",
    )
    assert r.llen(QUEUE) == 0


class TestHostileQueue:
    """Each malformed variant is dead-lettered with a reason naming the problem."""

    def test_every_variant_between_good_tasks(
        self, r: redis.Redis, worker: Worker, template: Envelope
    ) -> None:
        url = wait_address(r, worker.hostname)["url"]
        tokens = [f"good-{i}" for i in range(len(VARIANTS) + 1)]
        push(r, good(template, tokens[0]))
        for (name, variant, _), token in zip(VARIANTS, tokens[1:], strict=True):
            push(r, variant(good(template, f"bad-{name}")))
            push(r, good(template, token))
        settle(r, ran=len(tokens), refused=len(VARIANTS))

        ran = [t.decode() for t in r.lrange(TOKENS, 0, -1)]
        assert sorted(ran) == sorted(tokens), "every good task ran, exactly once, no bad one"
        store = DeadLetterStore(r)
        assert store.total() == len(VARIANTS)
        letters = store.latest(1000)
        reasons = [letter.reason for letter in letters]
        for name, _, expected in VARIANTS:
            assert any(expected in reason for reason in reasons), (name, expected, reasons)
        big = [x for x in letters if x.raw_size == RAW_KEEP * 20]
        assert big and len(base64.b64decode(big[0].raw_body or "")) == RAW_KEEP
        assert worker.process is not None and worker.process.poll() is None
        assert ready(url) == 200

    def test_poison_in_the_unacked_hash_is_quarantined(
        self, r: redis.Redis, worker: Worker, template: Envelope
    ) -> None:
        # As if a worker had died holding them: entries older than the visibility timeout.
        r.hset("unacked", mapping={"tag-bad": b"not json", "tag-list": b"[1]"})
        r.zadd("unacked_index", {"tag-bad": 1.0, "tag-list": 1.0})
        push(r, good(template, "after"))
        poll(lambda: DeadLetterStore(r).total() >= 2, deadline=30, what="unacked poison kept")
        reasons = {letter.reason for letter in DeadLetterStore(r).latest()}
        assert any("unacked entry is not JSON" in x for x in reasons), reasons
        assert any("not [message, exchange, routing_key]" in x for x in reasons), reasons
        poll(lambda: r.llen(TOKENS) == 1, what="the good task")
        assert r.hlen("unacked") == 0 or not r.hexists("unacked", "tag-bad")


MUTANT_VALUES = st.one_of(
    st.none(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.text(max_size=20),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.booleans(),
)
FIELDS = [
    "headers.id", "headers.task", "headers.timelimit", "headers.retries", "headers.argsrepr",
    "headers.root_id", "headers.parent_id", "headers.group", "headers.lang", "headers.origin",
    "properties.delivery_tag", "properties.delivery_info", "properties.priority",
    "properties.body_encoding", "properties.reply_to", "properties.correlation_id",
    "content-type", "content-encoding", "headers", "properties",
]  # fmt: skip


class TestGeneratedEnvelopes:
    """Hypothesis retypes or drops envelope fields; nothing stops the worker, nothing is lost."""

    @settings(
        max_examples=4,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(
        mutations=st.lists(
            st.tuples(st.sampled_from(FIELDS), st.one_of(st.just(...), MUTANT_VALUES)),
            min_size=8,
            max_size=8,
        )
    )
    def test_sent_is_run_plus_dead_lettered(
        self,
        r: redis.Redis,
        worker: Worker,
        template: Envelope,
        mutations: list[tuple[str, Any]],
    ) -> None:
        store = DeadLetterStore(r)
        before_ran, before_dead = r.llen(TOKENS), store.total()
        sent = 0
        for i, (path, value) in enumerate(mutations):
            push(r, edit(path, value)(good(template, f"mutant-{uuid.uuid4().hex}-{i}")))
            push(r, good(template, f"plain-{uuid.uuid4().hex}"))
            sent += 2

        def accounted() -> bool:
            return (r.llen(TOKENS) - before_ran) + (store.total() - before_dead) >= sent

        poll(accounted, deadline=60, what="every message run or dead-lettered")
        assert (r.llen(TOKENS) - before_ran) + (store.total() - before_dead) == sent
        assert r.llen(QUEUE) == 0
        tokens = [t.decode() for t in r.lrange(TOKENS, 0, -1)]
        assert len(tokens) == len(set(tokens)), "no task ran twice"
        assert worker.process is not None and worker.process.poll() is None
