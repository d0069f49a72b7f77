"""The broker transport: kombu's Redis transport, refusing poison instead of crashing on it.

kombu's Redis channel decodes each item it pops (`BRPOP`, `RPOP`) or restores
from its `unacked` hash with a bare `json.loads` and hands it to the virtual
transport, which indexes it as a kombu envelope. An item that is not JSON, not
an object, or lacks `properties` raises inside kombu, before Celery or Bulwark
sees a message: the worker stops ("Unrecoverable error") and the item is gone.

`GuardedTransport` (selected by `broker_transport` in `workers.celeryconfig`)
parses every item with `workers.envelope.parse_envelope` first. A malformed
one is quarantined: kept in the dead-letter store with its raw bytes (the
first `RAW_KEEP`, and the original length) and the reason, counted in
`bulwark_poison_messages_total{queue, source}`, logged without its content;
the worker goes on with the next item. If the policies' Redis cannot take the
dead letter, it is kept in a dead-letter store on the broker's Redis instead.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps as kombu_dumps

from policies.deadletter import DeadLetter, DeadLetterStore
from policies.replay import Replays, state
from workers.envelope import envelope_problem, kept_raw, parse_envelope
from workers.redis_pool import LeanConnectionPool, execute_meanwhile
from workers.resources import deadletters
from workers.security.verifier import (
    CONSUMED_FROM,
    FROM_JSON,
    JTI_SEEN,
    jti_of,
    verify_early,
)
from workers.telemetry.metrics import metrics

__all__ = [
    "GuardedChannel",
    "GuardedQoS",
    "GuardedSentinelChannel",
    "GuardedSentinelTransport",
    "GuardedTransport",
    "keep",
    "quarantine",
]

logger = logging.getLogger(__name__)

#: Set on a kombu message by `GuardedQoS.append`: its (jti, exp), for the acknowledgement.
JTI = "bulwark_jti"

#: How long an acknowledgement made on the event loop may wait for the next delivery's
#: record to carry it (one round trip for both) before it is sent alone.
ACK_WITHIN = 0.01

#: `task_name` of a dead letter whose message could not be read at all.
UNREADABLE = "<unreadable message>"


def quarantine(
    raw: bytes | str, reason: str, queue: str | None, *, source: str, broker: Any = None
) -> DeadLetter | None:
    """Keep a refused queue item with its reason; count and log it. Never raises."""
    data = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else bytes(raw)
    letter = DeadLetter(
        task_name=UNREADABLE,
        queue=queue,
        reason=f"poison message ({source}): {reason}",
        **kept_raw(data),
    )
    kept = keep(letter, broker)
    try:
        metrics().poison.labels(queue=queue or "unknown", source=source).inc()
    except Exception:  # a metric must never stop the consumer
        logger.exception("poison message metric failed")
    logger.error(
        "poison message refused from %s %s: %s (%d bytes)",
        source,
        queue or "?",
        reason,
        len(data),
        extra={"deadletter_id": kept.id if kept else None},
    )
    return kept


def keep(letter: DeadLetter, broker: Any) -> DeadLetter | None:
    """Add `letter` to the dead-letter store; to one on the broker's Redis if that fails."""
    try:
        return deadletters().add(letter)
    except redis.RedisError as exc:
        logger.warning("dead-letter store unreachable (%s); keeping it on the broker", exc)
    if broker is not None:
        try:
            return DeadLetterStore(broker).add(letter)
        except redis.RedisError as exc:
            logger.error("broker's dead-letter store unreachable too: %s", exc)
    return None


#: Deliveries this process could not settle while the broker was away (a failover, a
#: restart): delivery tag -> "ack" (the task ran: drop its `unacked` entry) or "restore"
#: (it did not: put it back on its queue). Settled by the next delivery, once the broker
#: answers again; otherwise kombu would leave them in `unacked` for the whole visibility
#: timeout (an hour by default) before anyone runs them.
_unsettled: dict[str, str] = {}
#: Messages popped from their queue whose `unacked` record then failed (the broker died
#: between the BRPOP and the record): (payload, exchange, routing key), put back on their
#: queue once the broker is back. Without this they were nowhere.
_popped: list[tuple[Any, str, str]] = []
_unsettled_lock = threading.Lock()

#: What a broker that went away raises.
_GONE = (redis.ConnectionError, redis.TimeoutError)


def note(message: Any, queue: str) -> None:
    """Note on a message, for its verification, the queue it was taken from and that its
    headers came out of the JSON envelope."""
    setattr(message, CONSUMED_FROM, queue)
    setattr(message, FROM_JSON, True)


def unsettled() -> dict[str, str]:
    """The deliveries waiting to be settled (a copy, for tests and logs)."""
    with _unsettled_lock:
        return dict(_unsettled)


class GuardedQoS(kombu_redis.QoS):
    """Restores unacked messages, quarantining entries of the `unacked` hash that do not parse;
    notes each signed message's jti as delivered, and as done when it is acknowledged, in
    the round trips that record and remove the delivery (`policies.replay`), and verifies
    the message while its record is on the way (`execute_meanwhile`, `verify_early`). An ack or a
    restore that meets a broker gone away is kept and done once it is back (`_unsettled`).

    An acknowledgement made on the worker's event loop (prefork: the main process, as a
    child reports a task done) is not a round trip of its own: it rides on the pipeline
    that records the next delivery, or goes alone after `ACK_WITHIN`, or when the channel
    closes. kombu makes two round trips per task there, each waited for by the loop that
    feeds every pool process. A worker killed in that window runs the task again after the
    visibility timeout, as it would if killed just before its acknowledgement."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._bulwark_acks: list[tuple[Any, str | None]] = []  # (delivery tag, jti done)
        self._bulwark_acks_lock = threading.Lock()  # a pool's shutdown fires timers elsewhere

    def append(self, message: Any, delivery_tag: Any) -> None:
        if _unsettled or _popped:  # a delivery: the broker answers again
            self._settle()
        # kombu 5.7's `QoS.append`, with the replay record on the same pipeline.
        delivery = message.delivery_info
        exchange, routing_key = delivery["exchange"], delivery["routing_key"]
        signed = jti_of(message)
        delivering = getattr(self.channel, "_bulwark_delivering", None)
        if delivering is not None:
            note(message, delivering)
        acks = self._take_acks()
        try:
            with self.pipe_or_acquire() as pipe:
                self._queue_acks(pipe, acks)
                recorded = len(pipe)
                pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()})
                pipe.hset(self.unacked_key, delivery_tag, kombu_dumps([message._raw, exchange,
                                                                       routing_key]))  # fmt: skip
                seen = self._replays().queue_seen(pipe, *signed) if signed else None
                if signed and delivering is not None:  # verified while Redis records it
                    results = execute_meanwhile(pipe, functools.partial(verify_early, message))
                else:
                    results = pipe.execute(raise_on_error=False)
            errors = [r for r in results[recorded : recorded + 2] if isinstance(r, Exception)]
            if errors:
                raise errors[0]
        except _GONE as exc:
            for tag, _ in acks:
                self._defer(tag, "ack", exc)
            # Popped, not recorded: kombu drops the message when this raises. Keep it.
            with _unsettled_lock:
                _popped.append((message._raw, exchange, routing_key))
            logger.warning("broker unreachable (%s): delivery %s goes back on %s once it "
                           "is back", exc, delivery_tag, routing_key)  # fmt: skip
            raise
        except Exception:
            self._keep_acks(acks)  # refused with the record (a full Redis): the next one
            raise
        if seen is not None:
            reply = seen.reply(results)
            if not isinstance(reply, Exception):
                setattr(message, JTI_SEEN, state(reply))
                setattr(message, JTI, signed)
        kombu_redis.virtual.QoS.append(self, message, delivery_tag)

    def _replays(self) -> Replays:
        replays: Replays | None = getattr(self, "_bulwark_replays", None)
        if replays is None:
            replays = self._bulwark_replays = Replays(self.channel.client)
        return replays

    def ack(self, delivery_tag: Any) -> None:
        message = self._delivered.get(delivery_tag)
        signed = getattr(message, JTI, None)  # noted by `append`, with the replay record
        jti = signed[0] if signed is not None and getattr(message, JTI_SEEN, None) else None
        transport = self.channel.connection
        loop = transport._bulwark_loop if transport is not None else None
        if loop is not None and transport._bulwark_loop_thread == threading.get_ident():
            # On the event loop: sent with the next delivery's record, or within ACK_WITHIN.
            with self._bulwark_acks_lock:
                first = not self._bulwark_acks
                self._bulwark_acks.append((delivery_tag, jti))
            if first:
                loop.call_later(ACK_WITHIN, self.flush_acks)
        else:
            self.flush_acks([(delivery_tag, jti)])
        kombu_redis.virtual.QoS.ack(self, delivery_tag)

    def _take_acks(self) -> list[tuple[Any, str | None]]:
        with self._bulwark_acks_lock:
            acks, self._bulwark_acks = self._bulwark_acks, []
        return acks

    def _keep_acks(self, acks: list[tuple[Any, str | None]]) -> None:
        """Put acknowledgements that could not be sent back, first in line."""
        with self._bulwark_acks_lock:
            self._bulwark_acks[:0] = acks

    def _queue_acks(self, pipe: Any, acks: list[tuple[Any, str | None]]) -> None:
        for tag, jti in acks:
            self._remove_from_indices(tag, pipe)
            if jti is not None:
                Replays.queue_done(pipe, jti)

    def flush_acks(self, acks: list[tuple[Any, str | None]] | None = None) -> None:
        """Remove acknowledged deliveries from the unacked index, in one round trip."""
        acks = self._take_acks() if acks is None else acks
        if not acks:
            return
        try:
            with self.pipe_or_acquire() as pipe:
                self._queue_acks(pipe, acks)
                pipe.execute()
        except _GONE as exc:
            for tag, _ in acks:
                self._defer(tag, "ack", exc)
        except Exception as exc:  # refused (a full or read-only Redis): kept, sent later
            self._keep_acks(acks)
            logger.warning("%d acknowledgement(s) refused (%s): kept for the next delivery",
                           len(acks), exc)  # fmt: skip

    def restore_visible(self, *args: Any, **kwargs: Any) -> Any:
        # kombu's periodic sweep (every `unacked_restore_interval`): settle first, so that
        # a worker that gets no new delivery settles too.
        if _unsettled or _popped:
            self._settle()
        return super().restore_visible(*args, **kwargs)

    def _defer(self, tag: Any, action: str, exc: Exception) -> None:
        with _unsettled_lock:
            # A task that ran after its restore was deferred is done: ack wins.
            if _unsettled.get(str(tag)) != "ack":
                _unsettled[str(tag)] = action
        logger.warning("broker unreachable (%s): %s of delivery %s deferred until it is back",
                       exc, action, tag)  # fmt: skip

    def _settle(self) -> None:
        with _unsettled_lock:
            popped = list(_popped)
        for entry in popped:
            payload, exchange, routing_key = entry
            try:
                with self.channel.conn_or_acquire() as client, client.pipeline() as pipe:
                    self.channel._do_restore_message(payload, exchange, routing_key, pipe)
                    pipe.execute()
            except _GONE:
                return  # still away: the next delivery or sweep tries again
            with _unsettled_lock:
                _popped.remove(entry)
            logger.info("a delivery popped as the broker went away is back on %s", routing_key)
        with _unsettled_lock:
            pending = list(_unsettled.items())
        for tag, action in pending:
            try:
                if action == "ack":
                    self._remove_from_indices(tag).execute()
                else:
                    self._restore_by_tag(tag, None, False)
            except _GONE:
                return  # still away: the next delivery tries again
            with _unsettled_lock:
                if _unsettled.get(tag) == action:
                    del _unsettled[tag]
            logger.info("delivery %s settled now the broker is back: %s", tag, action)

    def restore_unacked(self, client: Any = None) -> None:
        """kombu's, run when the channel closes (also under a broker that went away). A
        channel closed under it cannot even make a client: kombu reads the connection's
        host from a connection already gone (AttributeError), and the worker stopped with
        "Unrecoverable error". Whatever it cannot restore now is deferred instead."""
        left = list(self._delivered)
        try:
            with self.channel.conn_or_acquire(client) as conn:
                while left:
                    self.restore_by_tag(left[0], client=conn)  # defers what meets _GONE
                    left.pop(0)
        except Exception as exc:  # any: a closing channel must not end the worker
            for tag in left:
                self._defer(tag, "restore", exc)
        self._delivered.clear()

    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> None:
        try:
            self._restore_by_tag(tag, client, leftmost)
        except _GONE as exc:
            self._defer(tag, "restore", exc)

    def _restore_by_tag(self, tag: Any, client: Any, leftmost: bool) -> None:
        channel: GuardedChannel = self.channel
        refused: list[tuple[bytes, str]] = []

        def restore_transaction(pipe: Any) -> None:
            refused.clear()
            raw = pipe.hget(self.unacked_key, tag)
            pipe.multi()
            self._remove_from_indices(tag, pipe)
            if raw:
                unpacked = _unacked_entry(raw)
                if isinstance(unpacked, str):
                    refused.append((raw, unpacked))
                else:
                    channel._do_restore_message(*unpacked, pipe, leftmost)

        with channel.conn_or_acquire(client) as conn:
            conn.transaction(restore_transaction, self.unacked_key)
            for raw, reason in refused:
                quarantine(raw, reason, None, source="unacked", broker=conn)


def _unacked_entry(raw: bytes) -> tuple[dict[str, Any], str, str] | str:
    """`(payload, exchange, routing_key)` of an `unacked` hash value, or why it is not one."""
    try:
        entry = json.loads(bytes_to_str(raw))  # plain JSON: kombu re-encodes it as it is
    except RecursionError:
        return "unacked entry is not JSON: nested too deeply"
    except Exception as exc:
        return f"unacked entry is not JSON: {exc}"
    if not (isinstance(entry, list) and len(entry) == 3):
        return "unacked entry is not [message, exchange, routing_key]"
    message, exchange, routing_key = entry
    if not isinstance(exchange, str) or not isinstance(routing_key, str):
        return "unacked entry has no text exchange and routing key"
    problem = envelope_problem(message)
    if problem is not None:
        return problem
    return message, exchange, routing_key


class GuardedChannel(kombu_redis.Channel):
    """kombu's Redis channel, parsing every popped item before delivering it.

    kombu builds a new `redis.Redis` (a dozen dicts of response callbacks) for every
    command it sends outside the BRPOP loop: each acknowledgement, each unacked-index
    record, each event published. The channel keeps one on its pool instead; the pool
    still hands out a connection per command, so it is as safe across threads.
    """

    QoS = GuardedQoS
    _bulwark_client: tuple[Any, Any] | None = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        if self.connection is None:
            # Closed when its connection was lost; a task it delivered may still finish and
            # ack through it. kombu would fail on the missing connection (AttributeError:
            # "Unrecoverable error", the worker gone); this is a broker away: deferred.
            raise redis.ConnectionError("the channel was closed with its connection")
        pool = self.pool
        kept = self._bulwark_client
        if kept is None or kept[0] is not pool:  # a new pool after a reconnect
            kept = self._bulwark_client = (pool, self._create_client())
        yield kept[1]

    #: The queue `_deliver_item` is delivering from, while it does (`GuardedQoS.append`
    #: notes it on the message before its record, as it verifies the message meanwhile).
    _bulwark_delivering: str | None = None

    def basic_consume(self, queue: str, no_ack: bool, callback: Any, consumer_tag: Any,
                      **kwargs: Any) -> Any:  # fmt: skip
        def noted(message: Any) -> Any:
            note(message, queue)
            return callback(message)

        return super().basic_consume(queue, no_ack, noted, consumer_tag, **kwargs)

    def _get_pool(self, asynchronous: bool = False) -> Any:
        # kombu's, on `LeanConnectionPool`: the acknowledgements' and records' round trips
        # skip redis-py's per-command socket peek. Its BRPOP client keeps one connection.
        params = self._connparams(asynchronous=asynchronous)
        self.keyprefix_fanout = self.keyprefix_fanout.format(db=params["db"])
        return LeanConnectionPool(**params)

    def close(self) -> None:
        try:
            if self._qos is not None and not self.closed:
                self._qos.flush_acks()  # acknowledged before the channel goes (or deferred)
        finally:
            super().close()

    def _deliver_item(self, item: bytes, queue: str) -> None:
        envelope = parse_envelope(item)
        problem = envelope.problem
        if problem is None and envelope.payload is not None:
            self._bulwark_delivering = queue
            try:
                self.connection._deliver(envelope.payload, queue)
                return
            except RecursionError:
                problem = "nested too deeply for kombu"
            finally:
                self._bulwark_delivering = None
        with self.conn_or_acquire() as client:
            quarantine(item, problem or "empty", queue, source="queue", broker=client)

    def _brpop_read(self, **options: Any) -> bool:
        # kombu 5.7's `_brpop_read`, with `_deliver_item` in place of `_deliver(loads(item))`.
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if dest__item:
                dest, item = dest__item
                dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
                self._queue_cycle.rotate(dest)
                self._deliver_item(item, dest)
                return True
            raise kombu_redis.Empty()
        finally:
            self._in_poll = None
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()

    def _get(self, queue: str) -> dict[str, Any]:
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                while True:
                    item = client.rpop(self._q_for_pri(queue, pri))
                    if not item:
                        break
                    envelope = parse_envelope(item)
                    if envelope.problem is None and envelope.payload is not None:
                        self._maybe_update_queues_expire(client, queue)
                        return envelope.payload
                    quarantine(item, envelope.problem or "empty", queue, source="queue",
                               broker=client)  # fmt: skip
            self._maybe_update_queues_expire(client, queue)
            raise kombu_redis.Empty()

    def _restore(self, message: Any, leftmost: bool = False) -> None:
        if not self.ack_emulation:
            super()._restore(message)
            return
        self.qos.restore_by_tag(message.delivery_tag, leftmost=leftmost)


class GuardedTransport(kombu_redis.Transport):
    """kombu's Redis transport with `GuardedChannel`."""

    Channel = GuardedChannel
    _bulwark_loop: Any = None
    _bulwark_loop_thread: int | None = None

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)
        self._bulwark_loop, self._bulwark_loop_thread = loop, threading.get_ident()


class GuardedSentinelChannel(GuardedChannel, kombu_redis.SentinelChannel):
    """`GuardedChannel` on the master the sentinels name (asked again after a failover)."""

    _get_pool = kombu_redis.SentinelChannel._get_pool  # the sentinels' pool, not the lean one


class GuardedSentinelTransport(GuardedTransport):
    """kombu's Sentinel transport with the poison guard (`sentinel://` brokers)."""

    Channel = GuardedSentinelChannel
    default_port = kombu_redis.SentinelTransport.default_port
    driver_type = kombu_redis.SentinelTransport.driver_type
    driver_name = kombu_redis.SentinelTransport.driver_name
