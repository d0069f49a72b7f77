"""The headers a signature covers are the same bytes whether or not they take kombu's JSON
round trip: plain headers (a consumer's) skip it, anything else takes it."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from kombu.utils import json as kombu_json

from policies.signing import UNSIGNED, canonical
from workers.security.signer import plain_headers

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
VALUES = st.recursive(
    SCALARS | st.tuples(st.integers(), st.none()) | st.datetimes(timezones=st.just(UTC)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=20,
)


def round_tripped(headers: dict[str, Any]) -> bytes:
    kept = {k: v for k, v in headers.items() if k not in UNSIGNED}
    return canonical(json.loads(kombu_json.dumps(kept)))


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(max_size=8), VALUES, max_size=8))
def test_signed_bytes_do_not_depend_on_the_shortcut(headers: dict[str, Any]) -> None:
    assert canonical(plain_headers(headers)) == round_tripped(headers)


def test_what_json_would_change_takes_the_round_trip() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    headers = {"timelimit": (None, 30), "eta": moment, "bulwark_sig": {"sig": "x"}}
    plain = plain_headers(headers)
    assert plain["timelimit"] == [None, 30]
    assert isinstance(plain["eta"], dict | str), "kombu's encoding of a date, not the object"
    assert "bulwark_sig" not in plain


def test_a_cycle_is_not_walked_forever() -> None:
    looped: list[Any] = []
    looped.append(looped)
    try:
        plain_headers({"task": "t", "x": looped})
    except ValueError as exc:  # kombu's JSON says so, as it did before the shortcut
        assert "ircular" in str(exc)
    else:
        raise AssertionError("a circular header was signed")
