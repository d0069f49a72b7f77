"""A trust store published in Redis (many hosts, one store): workers trust it only if the
admin root key signed it, and never an older version (a rollback past a revocation)."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
import redis

from policies.signing import SIG_HEADER
from policies.trust import PUBLISHED
from tests import kit
from tests.conftest import StartWorker
from tests.kit import poll
from tests.signing import sign_envelope
from workers.client import client
from workers.ops.cli import main
from workers.security.context import Security
from workers.security.keys import add_identity, load_private_key, read_trust, write_trust
from workers.settings import get_settings

pytestmark = pytest.mark.integration

TOKENS = "bulwark:{diagnostics:ping}:tokens"


def test_signed_store_revocation_forgery_and_rollback(
    r: redis.Redis, start_worker: StartWorker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "keys"
    trust = folder / "trust.toml"
    folder.mkdir()
    shutil.copy(kit.SECURITY_ENV["BULWARK_TRUST_FILE"], trust)
    _kid, key_file = add_identity(trust, folder, "temp", tasks=("bulwark.ping",))
    temp = Security(get_settings().security, None, "temp", load_private_key(key_file))
    monkeypatch.setenv("BULWARK_KEYS_DIR", str(folder))
    monkeypatch.setenv("BULWARK_TRUST_FILE", str(trust))
    get_settings.cache_clear()
    assert main(["keys", "root-init"]) == 0
    assert main(["keys", "publish"]) == 0
    first = r.get(PUBLISHED)
    assert first is not None and json.loads(first)["version"] == 1

    env = {"BULWARK_TRUST_FILE": "", "BULWARK_TRUST_ROOT_KEY_FILE": str(folder / "root.pub.pem")}
    worker = start_worker(["default"], name="published", env=env)
    client().send_task("bulwark.ping", args=["template"], queue="payments")
    template = json.loads(r.rpop("payments") or b"{}")
    template["headers"].pop(SIG_HEADER)

    def send(token: str) -> None:
        message = json.loads(json.dumps(template))
        message["headers"]["id"] = str(uuid.uuid4())
        message["body"] = (
            __import__("base64").b64encode(json.dumps([[token], {}, {}]).encode()).decode()
        )
        r.lpush("default", json.dumps(sign_envelope(message, "default", context=temp)))

    def ran() -> list[str]:
        return [t.decode() for t in r.lrange(TOKENS, 0, -1)]

    send("valid")
    poll(lambda: "valid" in ran(), what="a message of a published identity runs")

    # A store written into Redis by someone without the root key: refused, logged.
    forged = json.loads(first)
    forged.update(version=99, toml=forged["toml"].replace('"temp"', '"evil"'))
    r.set(PUBLISHED, json.dumps(forged))
    noticed: list[str] = []

    def seen(text: str) -> bool:  # a worker reads the store when a message comes
        noticed.append(f"probe-{len(noticed)}")
        send(noticed[-1])
        return text in worker.log.read_text()

    poll(lambda: seen("not signed by the root key"), every=0.5, what="the forgery noticed")
    send("after-forgery")
    poll(lambda: "after-forgery" in ran(), what="the last good store kept")

    # Revoked and published again (version 2): refused within seconds.
    r.set(PUBLISHED, first)  # the operator publishes over it
    assert temp.kid is not None
    write_trust(trust, read_trust(trust).revoke(temp.kid))
    assert main(["keys", "publish"]) == 0
    assert json.loads(r.get(PUBLISHED) or b"{}")["version"] == 2
    sent: list[str] = []

    def refused() -> bool:
        sent.append(f"revoked-{len(sent)}")
        send(sent[-1])
        return "is revoked" in worker.log.read_text()

    poll(refused, deadline=10, every=1.0, what="the revocation published")

    # Version 1 written back (a rollback to before the revocation): refused.
    r.set(PUBLISHED, first)
    before = len(noticed)
    poll(lambda: seen("(a rollback): refused"), every=0.5, what="the rollback noticed")
    # Sent before the workers re-read the store, a message may still run; from the first
    # refusal on, none does, not even after the rollback.
    after_refusal = {sent[-1], *noticed[before:]}
    assert not after_refusal & set(ran()), "the revoked key ran again"
