"""Scripts queued on a caller's pipeline: the first call loads the source, later ones
send only the SHA, and queueing never touches the network."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import redis

from policies.scripts import Scripts

pytestmark = pytest.mark.integration


class Sent(redis.Connection):
    """Keeps every command sent, by name."""

    commands: ClassVar[list[str]] = []

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        parts = command if isinstance(command, list) else [command]
        for part in parts:
            text = bytes(part).split(b"\r\n")
            Sent.commands.append(text[2].decode().upper())
        super().send_packed_command(command, check_health)


class TestQueue:
    """EVAL once, then EVALSHA; a server without the script answers NOSCRIPT and is reloaded."""

    def test_first_eval_then_evalsha(self, r: redis.Redis, redis_url: str) -> None:
        pool = redis.ConnectionPool.from_url(redis_url, connection_class=Sent)
        client = redis.Redis(connection_pool=pool)
        scripts = Scripts(client)
        replies = []
        for _ in range(2):
            pipe = client.pipeline(transaction=False)
            queued = scripts.queue(pipe, "bulkhead_snapshot", ["a", "b"], [])
            replies.append(queued.reply(pipe.execute(raise_on_error=False)))
        assert replies == [[b""], [b""]]
        sent = [c for c in Sent.commands if c in ("EVAL", "EVALSHA", "SCRIPT")]
        assert sent == ["EVAL", "EVALSHA"], "no SCRIPT LOAD or EXISTS round trip"

    def test_queueing_on_an_unreachable_server_does_not_raise(self) -> None:
        client = redis.Redis(port=1, socket_connect_timeout=0.2, retry=None)
        pipe = client.pipeline(transaction=False)
        queued = Scripts(client).queue(pipe, "bulkhead_snapshot", ["a", "b"], [])
        with pytest.raises(redis.ConnectionError):
            pipe.execute(raise_on_error=False)
        assert isinstance(queued.reply(redis.ConnectionError("down")), redis.ConnectionError)

    def test_noscript_reloads_and_runs_again(self, r: redis.Redis) -> None:
        scripts = Scripts(r)
        pipe = r.pipeline(transaction=False)
        scripts.queue(pipe, "bulkhead_snapshot", ["a", "b"], [])
        pipe.execute()
        r.script_flush()  # as a restarted server would have it
        pipe = r.pipeline(transaction=False)
        queued = scripts.queue(pipe, "bulkhead_snapshot", ["a", "b"], [])
        assert queued.reply(pipe.execute(raise_on_error=False)) == [b""]
