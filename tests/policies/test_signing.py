"""Message signatures: whatever decides what runs is covered; hostile headers never raise."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from policies.authz import Grant
from policies.signing import SIG_HEADER, Claims, check_message, parse_claims, queue_of, sign
from policies.trust import Identity, KeyEntry, TrustError, TrustStore, key_id

KEY = Ed25519PrivateKey.generate()
KID = key_id(KEY.public_key())
TRUST = TrustStore(
    {
        "billing": Identity(
            "billing", "producer", Grant(tasks=("payments.*",)), (KeyEntry(KID, KEY.public_key()),)
        )
    }
)
NOW = time.time()
HEADERS = {"task": "payments.charge", "id": "t-1", "retries": 0, "eta": None,
           "timelimit": [None, None], "bulwark_attempt": 1}  # fmt: skip
BODY = b'[["o-1", 100], {}, {"callbacks": null}]'


def signed(headers: dict[str, Any] | None = None, **claims: Any) -> dict[str, Any]:
    values = {"iss": "billing", "kid": KID, "iat": int(NOW), "exp": int(NOW) + 60,
              "jti": uuid.uuid4().hex, **claims}  # fmt: skip
    message = dict(headers or HEADERS)
    message[SIG_HEADER] = sign(KEY, Claims(**values), message, "payments", BODY, "application/json")
    return message


def check(headers: dict[str, Any], queue: str = "payments", body: bytes = BODY,
          content_type: str = "application/json", trust: TrustStore = TRUST) -> Any:  # fmt: skip
    return check_message(trust, headers, queue, body, content_type, now=NOW)


def test_a_signed_message_verifies() -> None:
    verdict = check(signed())
    assert not isinstance(verdict, str) and verdict.claims.iss == "billing"


@pytest.mark.parametrize(
    "name", ["task", "id", "retries", "eta", "timelimit", "bulwark_attempt", "new_header"]
)
def test_every_header_is_covered(name: str) -> None:
    message = signed()
    message[name] = "changed"
    assert "bad signature" in check(message)


def test_unsigned_headers_may_change_in_transit() -> None:
    message = signed()
    message.update(redelivered=True, traceparent="00-abc", bulwark_sent_at=1.0)
    assert not isinstance(check(message), str)


def test_rabbitmqs_own_headers_may_be_added_in_transit() -> None:
    """Dead-lettering through the delay queues, and a quorum queue's redelivery count."""
    message = signed()
    message.update({"x-death": [{"count": 1}], "x-first-death-queue": "celery_delayed_2",
                    "x-last-death-reason": "expired", "x-delivery-count": 2})  # fmt: skip
    assert not isinstance(check(message), str)
    message["x-deathly"] = "not RabbitMQ's"  # a look-alike is signed like any header
    assert "bad signature" in check(message)


DELAYED = ".".join("0" * 27 + "1") + ".payments"  # a 1 s countdown, native delayed delivery


def test_a_countdowns_delay_prefix_is_not_the_queue() -> None:
    assert queue_of(DELAYED) == "payments" == queue_of("payments")
    assert queue_of("1.0.payments") == "1.0.payments"  # not the 28-digit prefix
    assert not isinstance(check(signed(), queue=DELAYED), str)  # signed for "payments"
    assert "bad signature" in check(signed(), queue=DELAYED.replace("payments", "default"))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"queue": "default"}, "bad signature"),
        ({"body": BODY.replace(b"100", b"999")}, "bad signature"),
        ({"content_type": "application/x-yaml"}, "bad signature"),
    ],
)
def test_queue_body_and_content_type_are_covered(change: dict[str, Any], expected: str) -> None:
    assert expected in check(signed(), **change)


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        ({"exp": int(NOW) - 10}, "expired"),
        ({"iat": int(NOW) + 3600}, "in the future"),
        ({"iss": "nobody"}, "unknown producer 'nobody'"),
        ({"kid": "k0000000000000000"}, "unknown key"),
    ],
)
def test_claims_are_checked(claims: dict[str, Any], expected: str) -> None:
    assert expected in check(signed(**claims))


def test_revoked_key_and_grant() -> None:
    assert "is revoked" in check(signed(), trust=TRUST.revoke(KID))
    other = signed({**HEADERS, "task": "inventory.reserve"})
    assert "not allowed to send 'inventory.reserve'" in check(other)


@given(st.one_of(st.none(), st.integers(), st.text(), st.lists(st.integers()),
                 st.dictionaries(st.sampled_from(["iss", "kid", "iat", "exp", "jti", "sig"]),
                                 st.one_of(st.text(), st.integers(), st.none()))))  # fmt: skip
def test_parse_claims_never_raises(value: Any) -> None:
    assert isinstance(parse_claims(value), str | tuple)


def test_trust_store_round_trips_and_names_bad_entries() -> None:
    store = TRUST.with_identity(
        replace(TRUST.identities["billing"], grant=Grant(("payments.*",), ("payments",), 10, 2.5))
    )
    assert TrustStore.from_toml(store.to_toml()).to_toml() == store.to_toml()
    with pytest.raises(TrustError, match=r"identities.x.role is 'king'"):
        TrustStore.from_toml('[identities.x]\nrole = "king"\n')
    with pytest.raises(TrustError, match=r"keys\[0\].public is not a base64 Ed25519"):
        TrustStore.from_toml('[identities.x]\n[[identities.x.keys]]\npublic = "nope"\n')
