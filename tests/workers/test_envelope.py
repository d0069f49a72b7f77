"""Envelope and task-message checks never raise, and name what is wrong."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from workers.envelope import MAX_DEPTH, parse_envelope, task_problem

GOOD_HEADERS = {"id": "t-1", "task": "bulwark.ping", "retries": 0, "timelimit": [None, None]}
GOOD_BODY = [["x"], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


class TestNeverRaises:
    """Any bytes, any JSON: a verdict, never an exception."""

    @given(st.binary(max_size=300))
    def test_any_bytes(self, raw: bytes) -> None:
        parse_envelope(raw)

    @given(JSON_VALUES)
    def test_any_json(self, value: object) -> None:
        envelope = parse_envelope(json.dumps(value))
        assert envelope.problem is not None, "no random JSON is a kombu envelope"

    @given(JSON_VALUES, JSON_VALUES)
    def test_any_headers_and_body(self, headers: object, body: object) -> None:
        task_problem(headers, {}, body)  # type: ignore[arg-type]


class TestVerdicts:
    """What kombu or Celery would trip on is named."""

    def test_deep_nesting_is_refused_before_kombu_sees_it(self) -> None:
        deep = "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5)
        raw = '{"body": "", "headers": {"x": ' + deep + "}}"
        assert parse_envelope(raw).problem == f"nested deeper than {MAX_DEPTH} levels"

    def test_kombu_type_hooks_that_raise(self) -> None:
        raw = json.dumps({"headers": {"x": {"__type__": "uuid", "__value__": 1}}})
        problem = parse_envelope(raw).problem
        assert problem is not None and problem.startswith("not JSON:")

    def test_retries_must_be_a_number(self) -> None:
        assert task_problem(GOOD_HEADERS, {}, GOOD_BODY) is None
        problem = task_problem({**GOOD_HEADERS, "retries": "3"}, {}, GOOD_BODY)
        assert problem is not None and "'retries'" in problem
