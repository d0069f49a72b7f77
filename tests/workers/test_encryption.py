"""Encrypted tasks on a real worker: the arguments and results of tasks named by
BULWARK_ENCRYPT never appear in plaintext in Redis (queues, unacked hash, result
backend, dead-letter store) or in the worker's log; a flipped ciphertext bit or a
retired key is refused with its reason; a rotated key still opens what is queued."""

from __future__ import annotations

import base64
import json
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from policies.deadletter import DeadLetterStore
from policies.sealing import KeyRing
from tests import kit
from tests.conftest import StartWorker
from tests.kit import Worker, poll, redis_contents
from tests.signing import sign_envelope
from workers.client import client
from workers.ops.deadletters import replay
from workers.security import sealed
from workers.settings import get_settings

pytestmark = pytest.mark.integration

ENCRYPT = "inventory.*,payments.*"


@pytest.fixture
def ring_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the session's data keys that this test may rotate; this process seals too."""
    copied = tmp_path / "data-keys.json"
    shutil.copy(kit.SECURITY_ENV["BULWARK_DATA_KEYS_FILE"], copied)
    copied.chmod(0o600)
    monkeypatch.setenv("BULWARK_DATA_KEYS_FILE", str(copied))
    monkeypatch.setenv("BULWARK_ENCRYPT", ENCRYPT)
    get_settings.cache_clear()
    sealed.forget()
    return copied


@pytest.fixture
def worker(r: redis.Redis, start_worker: StartWorker, ring_file: Path) -> Iterator[Worker]:
    env = {"BULWARK_ENCRYPT": ENCRYPT, "BULWARK_DATA_KEYS_FILE": str(ring_file),
           "BULWARK_LOG_LEVEL": "debug"}  # fmt: skip
    yield start_worker(["inventory", "payments"], name="sealed", env=env)


def everything_in(r: redis.Redis) -> bytes:
    """Every key in Redis and all it holds, as one text to search."""
    return b"\n".join(key + b"\n" + value for key, value in redis_contents(r).items())


class TestEncrypted:
    def test_no_plaintext_at_rest_or_in_logs(
        self, r: redis.Redis, worker: Worker, tmp_path: Path
    ) -> None:
        canary = f"canary-{uuid.uuid4().hex}"
        app = client()
        # Queued while no worker of theirs runs? No: sent and read back through the worker.
        reserved = app.send_task("inventory.reserve", args=[canary, 3])
        assert reserved.get(timeout=30) == {"sku": canary, "reserved": 3}, "opened to be run"
        failed = app.send_task("payments.charge", args=[f"{canary}-order", 0])  # ValueError
        with pytest.raises(ValueError):
            failed.get(timeout=30)
        (letter,) = poll(DeadLetterStore(r).latest, what="the charge dead-lettered")
        assert letter.args == [] and sealed.is_sealed(letter.kwargs), "kept sealed"
        assert "(sealed)" in (letter.error or "")

        stored = everything_in(r)
        assert canary.encode() not in stored, "no argument in plaintext anywhere in Redis"
        assert worker.log is not None and canary not in worker.log.read_text()

        # Replay opens the dead letter and sends it anew, sealed again.
        ok, said = replay(DeadLetterStore(r), letter.id)
        assert ok, said
        assert canary.encode() not in everything_in(r)

    def test_tampered_ciphertext_rotation_and_retired_key(
        self, r: redis.Redis, worker: Worker, ring_file: Path
    ) -> None:
        app = client()

        def sealed_message(sku: str, *, flip: bool = False) -> dict:  # type: ignore[type-arg]
            """A real sealed message (taken off a queue no worker here reads); re-signed
            after the edit, so that only the ciphertext is wrong."""
            app.send_task("inventory.reserve", args=[sku, 1], queue="default")
            message = json.loads(r.rpop("default") or b"{}")
            if flip:
                body = json.loads(base64.b64decode(message["body"]))
                head, _, data = body[1][sealed.SEALED].rpartition(".")
                raw = bytearray(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))
                raw[-1] ^= 0x01
                body[1][sealed.SEALED] = head + "." + base64.urlsafe_b64encode(raw).decode()
                message["body"] = base64.b64encode(json.dumps(body).encode()).decode()
            jti = message["headers"]["bulwark_sig"]["jti"]
            return sign_envelope(message, "inventory", jti=jti)

        store = DeadLetterStore(r)
        r.lpush("inventory", json.dumps(sealed_message("flipped", flip=True)))
        reason = poll(lambda: next((x.reason for x in store.latest()), None), what="flipped")
        assert "sealed arguments do not open" in reason and "authentication" in reason

        # Sealed under the key that is rotated away: one for inside the overlap, and
        # a few for after the key is retired.
        inside = sealed_message("inside-overlap")
        later = [sealed_message(f"after-retire-{i}") for i in range(10)]
        old_kid = KeyRing.load(ring_file).active.kid
        KeyRing.load(ring_file).rotate(time.time(), 3600).save(ring_file)
        r.lpush("inventory", json.dumps(inside))
        done = app.AsyncResult(inside["headers"]["id"])
        assert done.get(timeout=30) == {"sku": "inside-overlap", "reserved": 1}

        KeyRing.load(ring_file).retire(old_kid).save(ring_file)
        pending = iter(later)  # workers re-read the ring within 2 s: send until refused

        def refused() -> str | None:
            r.lpush("inventory", json.dumps(next(pending)))
            return next((x.reason for x in store.latest() if "retired" in x.reason), None)

        reason = poll(refused, deadline=9, every=1.0, what="a retired key refused")
        assert old_kid in reason
