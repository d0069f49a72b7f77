"""Key names: one builder, hash-tagged per policy instance."""

from __future__ import annotations

import pytest

from policies import keys


def test_keys_of_one_instance_share_a_hash_tag() -> None:
    a = keys.key("breaker", "payments", "state")
    b = keys.key("breaker", "payments", "trials")
    assert a == "bulwark:{breaker:payments}:state"
    assert a.split("}")[0] == b.split("}")[0]
    assert keys.name_of(a) == "payments"


@pytest.mark.parametrize("bad", ["", "a{b", "a}b", "a b", "ä"])
def test_unsafe_names_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="must be non-empty"):
        keys.key("breaker", bad, "state")
