"""Authorization is a pure decision; task-name globs match as fnmatch does, in linear time."""

from __future__ import annotations

import fnmatch

from hypothesis import given
from hypothesis import strategies as st

from policies.authz import Grant, authorize, glob_match

# fnmatch's other metacharacters (? [ ]) are literal in Bulwark's globs: leave them out.
TEXT = st.text(alphabet="ab.*", max_size=12)
NAME = st.text(alphabet="ab.", max_size=16)


@given(TEXT, NAME)
def test_glob_match_is_fnmatch_for_star_globs(pattern: str, name: str) -> None:
    assert glob_match(pattern, name) == fnmatch.fnmatchcase(name, pattern)


def test_a_hostile_name_costs_one_pass_per_segment() -> None:
    # A nested-quantifier regex would backtrack here; str.find walks the name once per star.
    name = "a" * 200_000
    assert not glob_match("*a*a*a*a*a*b", name)
    assert glob_match("*a*a*a*a*a*", name)


class TestAuthorize:
    def test_deny_by_default(self) -> None:
        assert authorize(None, "payments.charge", "payments", 10) == "no grant: denied by default"
        assert authorize(Grant(), "payments.charge", "payments", 10) is not None

    def test_tasks_queues_and_size(self) -> None:
        grant = Grant(tasks=("payments.*",), queues=("payments",), max_payload=100)
        assert authorize(grant, "payments.charge", "payments", 100) is None
        assert "not allowed to send 'inventory.reserve'" in str(
            authorize(grant, "inventory.reserve", "payments", 1)
        )
        assert "queue 'default'" in str(authorize(grant, "payments.charge", "default", 1))
        assert "101 bytes is over its limit of 100" in str(
            authorize(grant, "payments.charge", "payments", 101)
        )

    @given(NAME, NAME, st.integers(min_value=0, max_value=10**6))
    def test_star_allows_everything_of_any_size_without_a_limit(
        self, task: str, queue: str, size: int
    ) -> None:
        assert authorize(Grant(tasks=("*",)), task, queue, size) is None
