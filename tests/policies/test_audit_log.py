"""`AuditLog`: records made at once, written in batches to the stream and the file, kept
through a sink's outage, checkpointed by count and by time; on fakeredis and on a real
redis-server."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis

from policies.audit import (
    AUDIT_CHECKPOINTS,
    AUDIT_STREAM,
    Action,
    AuditConfig,
    AuditLog,
    Flaw,
    args_digest,
    file_name,
    read_dir,
    read_heads,
    read_stream,
    read_tail,
    verify,
    writer_id,
)
from policies.clock import FakeClock
from tests.kit import poll
from tests.policies.test_audit import CANARY, KEY, PUBLIC
from workers.ops.embedded import EmbeddedRedis

WRITER = "host:1:aa"


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def client(server: fakeredis.FakeServer) -> Iterator[fakeredis.FakeRedis]:
    c = fakeredis.FakeRedis(server=server)
    yield c
    c.close()


class RoundTrips:
    """Counts what a client sends: pipelines executed and single commands."""

    def __init__(self, client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pipelines = 0
        self.commands = 0
        make_pipeline: Any = client.pipeline
        execute: Any = client.execute_command

        def pipeline(*args: Any, **kwargs: Any) -> Any:
            pipe = make_pipeline(*args, **kwargs)
            run = pipe.execute

            def counted(*a: Any, **k: Any) -> Any:
                self.pipelines += 1
                return run(*a, **k)

            pipe.execute = counted
            return pipe

        def command(*args: Any, **kwargs: Any) -> Any:
            self.commands += 1
            return execute(*args, **kwargs)

        monkeypatch.setattr(client, "pipeline", pipeline)
        monkeypatch.setattr(client, "execute_command", command)


def make_log(
    client: redis.Redis | None,
    directory: Path | None,
    clock: FakeClock | None = None,
    writer: str = WRITER,
    **config: Any,
) -> AuditLog:
    return AuditLog(
        writer=writer,
        signing_key=KEY,
        client=client,
        directory=directory,
        config=AuditConfig(**config),
        clock=time.monotonic if clock is None else clock,
    )


def accepted(log: AuditLog, i: int, body: bytes = b"[]") -> None:
    log.record(
        Action.MESSAGE_ACCEPTED,
        actor="producer:demo",
        task_id=f"task-{i}",
        args_digest=args_digest(body),
    )


def stream_report(client: redis.Redis, **kwargs: Any) -> Any:
    return verify(read_stream(client), PUBLIC, heads=read_heads(client), **kwargs)


class TestBatching:
    """Recording does no I/O; a flush is one write per sink, one round trip to Redis."""

    def test_record_writes_nothing_and_flush_writes_all_in_one_round_trip(
        self, client: fakeredis.FakeRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        trips = RoundTrips(client, monkeypatch)
        log = make_log(client, tmp_path)
        for i in range(250):
            accepted(log, i)
        assert (trips.pipelines, trips.commands) == (0, 0)
        assert not (tmp_path / file_name(WRITER)).exists()
        assert log.pending == {
            f"file:{tmp_path / file_name(WRITER)}": 252,
            "redis:bulwark:audit": 252,
        }
        assert log.flush() is True
        assert (trips.pipelines, trips.commands) == (1, 0), "one pipelined round trip"
        assert set(log.pending.values()) == {0}
        assert client.xlen(AUDIT_STREAM) == 252, "250 events and 2 checkpoints"
        assert stream_report(client).ok
        file_report = verify(read_dir(tmp_path), PUBLIC)
        assert file_report.ok and file_report.records == 252 and file_report.checkpoints == 2

    def test_the_stream_is_trimmed_approximately(self, client: fakeredis.FakeRedis) -> None:
        log = make_log(client, None, maxlen=10)
        for i in range(500):
            accepted(log, i)
        log.flush()
        assert client.xlen(AUDIT_STREAM) < 500
        assert stream_report(client, trimmed=True).ok

    def test_queue_flush_rides_the_callers_pipeline(
        self, client: fakeredis.FakeRedis, tmp_path: Path
    ) -> None:
        log = make_log(client, tmp_path)
        for i in range(3):
            accepted(log, i)
        with client.pipeline(transaction=False) as pipe:
            pipe.set("callers-own", "1")
            handle = log.queue_flush(pipe)
            assert log.pending[f"file:{tmp_path / file_name(WRITER)}"] == 0, "file written now"
            assert client.xlen(AUDIT_STREAM) == 0
            results = pipe.execute(raise_on_error=False)
        assert results[0] is True
        assert handle.settle(results) is True
        assert client.xlen(AUDIT_STREAM) == 3 and set(log.pending.values()) == {0}

    def test_a_failed_pipeline_leaves_the_records_pending(
        self, client: fakeredis.FakeRedis
    ) -> None:
        clock = FakeClock()
        log = make_log(client, None, clock, retry_interval=1.0)
        accepted(log, 1)
        with client.pipeline(transaction=False) as pipe:
            handle = log.queue_flush(pipe)
            assert log.flush() is False, "one batch in flight per sink: nothing sent meanwhile"
        assert handle.settle(redis.ConnectionError("lost")) is False
        assert log.pending == {"redis:bulwark:audit": 1}
        accepted(log, 2)
        assert log.flush() is False, "tried again only after retry_interval"
        clock.advance(1.0)
        assert log.flush() is True
        assert [e.seq for e in read_stream(client)] == [1, 2]

    def test_a_handle_never_settled_is_sent_again(self, client: fakeredis.FakeRedis) -> None:
        clock = FakeClock()
        log = make_log(client, None, clock, stale_after=30.0)
        accepted(log, 1)
        with client.pipeline(transaction=False) as pipe:
            lost = log.queue_flush(pipe)
            results = pipe.execute()
        clock.advance(31.0)
        assert log.flush() is True
        assert lost.settle(results) is True  # late: already put back and sent again
        report = stream_report(client)
        assert report.ok and report.repeats == 1, "the batch landed twice; no false alarm"


class TestCheckpoints:
    """Every N records, after T seconds with unsigned records, and when the log stops."""

    def test_by_count(self, client: fakeredis.FakeRedis) -> None:
        log = make_log(client, None, checkpoint_every=10)
        for i in range(25):
            accepted(log, i)
        log.flush()
        seqs = [e.seq for e in read_stream(client) if e.record and e.record.is_checkpoint]
        assert seqs == [11, 22]
        (head,) = read_heads(client)
        assert head.record is not None and head.record.seq == 22

    def test_by_time_checked_on_flush(self, client: fakeredis.FakeRedis) -> None:
        clock = FakeClock()
        log = make_log(client, None, clock, checkpoint_interval=10.0)
        accepted(log, 1)
        log.flush()
        clock.advance(9.9)
        log.flush()
        assert client.xlen(AUDIT_STREAM) == 1
        clock.advance(0.1)
        log.flush()
        assert read_tail(client, 1)[0][0].record.is_checkpoint  # type: ignore[union-attr]
        clock.advance(60)
        log.flush()
        assert client.xlen(AUDIT_STREAM) == 2, "nothing unsigned: no empty checkpoint"

    def test_stop_seals_the_chain_so_a_cut_file_shows(
        self, client: fakeredis.FakeRedis, tmp_path: Path
    ) -> None:
        log = make_log(client, tmp_path).start(interval=0.05)
        for i in range(5):
            accepted(log, i)
        assert log.stop() is True
        path = tmp_path / file_name(WRITER)
        assert verify(read_dir(tmp_path), PUBLIC, heads=read_heads(client)).ok
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(lines[:-1]))
        (problem,) = verify(read_dir(tmp_path), PUBLIC, heads=read_heads(client)).problems
        assert (problem.seq, problem.position, problem.flaw) == (6, 5, Flaw.TRUNCATED)


class TestOutage:
    """A failing sink never raises: its records wait, bounded, and are written later."""

    def test_redis_down_keeps_records_and_writes_them_later(
        self,
        server: fakeredis.FakeServer,
        client: fakeredis.FakeRedis,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        clock = FakeClock()
        log = make_log(client, tmp_path, clock, retry_interval=1.0, checkpoint_every=7)
        accepted(log, 0)
        log.flush()
        server.connected = False
        with caplog.at_level(logging.WARNING, logger="policies.audit.log"):
            for i in range(1, 30):
                accepted(log, i)
                assert log.flush() is False
                clock.advance(0.5)
        warnings = [r for r in caplog.records if "failing" in r.getMessage()]
        assert len(warnings) == 1, "said once per outage"
        assert log.pending["redis:bulwark:audit"] == 29 + 4
        server.connected = True
        clock.advance(1.0)
        assert log.flush() is True
        report = stream_report(client)
        assert report.ok and report.records == 34, "nothing lost, in order"
        assert verify(read_dir(tmp_path), PUBLIC).records == 34

    def test_the_backlog_is_bounded_and_the_loss_shows_as_a_gap(
        self, server: fakeredis.FakeServer, client: fakeredis.FakeRedis
    ) -> None:
        clock = FakeClock()
        log = make_log(client, None, clock, max_pending=5, checkpoint_every=1000)
        accepted(log, 0)
        log.flush()
        server.connected = False
        for i in range(1, 13):
            accepted(log, i)
            log.flush()
        assert log.dropped == {"redis:bulwark:audit": 7}
        server.connected = True
        clock.advance(5)
        log.flush()
        (problem,) = stream_report(client).problems
        assert (problem.seq, problem.flaw) == (2, Flaw.DELETED)
        assert "seq 2..8 missing" in problem.reason

    def test_a_broken_file_sink_does_not_stop_the_stream(
        self, client: fakeredis.FakeRedis, tmp_path: Path
    ) -> None:
        clock = FakeClock()
        blocked = tmp_path / "audit"
        blocked.write_text("a file where the folder should be")
        log = make_log(client, blocked, clock)
        accepted(log, 1)
        assert log.flush() is False
        assert client.xlen(AUDIT_STREAM) == 1
        blocked.unlink()
        clock.advance(1.0)
        assert log.flush() is True
        assert verify(read_dir(blocked), PUBLIC).records == 1


class TestNoArguments:
    """A record keeps the digest of the arguments; no argument value reaches a sink."""

    def test_the_canary_never_reaches_a_sink(
        self, client: fakeredis.FakeRedis, tmp_path: Path
    ) -> None:
        body = f'[["{CANARY}"], {{"card": "{CANARY}"}}]'.encode()
        log = make_log(client, tmp_path)
        log.record(
            Action.MESSAGE_EXECUTED,
            actor="worker:host:1",
            task_id="t-1",
            args_digest=args_digest(body),
            details={"outcome": "success"},
        )
        with pytest.raises(ValueError):
            log.record(Action.MESSAGE_ACCEPTED, actor="x", args_digest=CANARY)
        log.stop()
        stored = [e.record for e in read_stream(client)]
        assert stored[0] is not None and stored[0].args_digest == args_digest(body)
        dumped = repr(client.xrange(AUDIT_STREAM)) + repr(client.hgetall(AUDIT_CHECKPOINTS))
        dumped += "".join(p.read_text() for p in tmp_path.iterdir())
        assert CANARY not in dumped


class TestThreads:
    """Many threads of one process record at once: one unbroken chain."""

    def test_concurrent_records_make_one_chain(
        self, client: fakeredis.FakeRedis, tmp_path: Path
    ) -> None:
        log = make_log(client, tmp_path).start(interval=0.01)

        def work(n: int) -> None:
            for i in range(200):
                accepted(log, n * 1000 + i)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert log.stop() is True
        report = stream_report(client)
        assert report.ok and report.records - report.checkpoints == 1600
        assert verify(read_dir(tmp_path), PUBLIC).ok


@pytest.mark.integration
class TestRealRedis:
    """On a real redis-server: a fleet of writers in one stream, and a real outage."""

    def test_writers_interleaved_in_one_stream(self, r: redis.Redis, tmp_path: Path) -> None:
        logs = [
            make_log(r, tmp_path, writer=writer_id(f"w{n}"), checkpoint_every=13).start(0.01)
            for n in range(4)
        ]

        def work(log: AuditLog) -> None:
            for i in range(150):
                accepted(log, i)

        threads = [threading.Thread(target=work, args=(log,)) for log in logs]
        for t in threads:
            t.start()
        poll(lambda: r.xlen(AUDIT_STREAM) >= 4 * 100, what="records in the stream")
        for t in threads:
            t.join()
        for log in logs:
            assert log.stop() is True
        writers = [e.writer or "" for e in read_stream(r)]
        assert writers != sorted(writers), "interleaved in the stream"
        report = stream_report(r)
        assert report.ok, report.problems
        assert report.writers == 4 and report.records - report.checkpoints == 600
        assert len(read_heads(r)) == 4
        files = verify(read_dir(tmp_path), PUBLIC, heads=read_heads(r))
        assert files.ok and files.writers == 4

    def test_a_killed_server_loses_nothing(self, spare_redis: EmbeddedRedis) -> None:
        client = redis.Redis.from_url(spare_redis.url, socket_timeout=1, socket_connect_timeout=1)
        log = make_log(client, None, retry_interval=0.05).start(interval=0.02)
        spare_redis.kill()
        for i in range(40):
            accepted(log, i)
        poll(lambda: log.pending["redis:bulwark:audit"] >= 40, what="records kept pending")
        spare_redis.restart()
        poll(lambda: client.xlen(AUDIT_STREAM) >= 40, what="records written after the outage")
        assert log.stop() is True
        report = stream_report(client)
        assert report.ok and report.records == 41 and report.chains[0].first_seq == 1
        client.close()
