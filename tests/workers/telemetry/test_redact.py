"""Redaction runs in linear time on hostile text: the work is bounded, not timed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.telemetry.logs import redact_value
from workers.telemetry.redact import LOOKAHEAD, MASK, MAX_SCAN, _Scan, redact

N = 60_000  # below MAX_SCAN: every character is scanned

#: Texts built to make a backtracking scanner quadratic (the old regexes took 2.4 s on the
#: first one at 10 KB), and texts dense with secrets.
HOSTILE = {
    "one long word": "x" * N,
    "long word with a key inside": "x" * (N // 2) + "password" + "x" * (N // 2),
    "keys without values": "password=" * (N // 9),
    "schemes without passwords": "a://x:" * (N // 6),
    "unclosed quotes": 'token: "' * (N // 8),
    "escaped quotes": 'token: "\\"' * (N // 10),
    "dense secrets": "token=x " * (N // 8),
    "dashes": "-" * N,
    "colons": "redis://" + ":" * N,
    "backslashes before a quote": 'secret: "' + "\\" * N + '"',
}


class TestLinearWork:
    """Characters read past the words stay within a small multiple of the text's length."""

    @pytest.mark.parametrize("name", sorted(HOSTILE))
    def test_reads_are_linear(self, name: str) -> None:
        text = HOSTILE[name]
        scan = _Scan(text)
        scan.run()
        assert scan.reads <= 3 * len(text) + 10, (name, scan.reads, len(text))

    @given(st.text(alphabet=st.sampled_from(list("ab:=/@ \"\\'token-pwd\n")), max_size=3000))
    def test_reads_are_linear_for_any_text(self, text: str) -> None:
        scan = _Scan(text)
        scan.run()
        assert scan.reads <= 3 * len(text) + 10

    def test_long_text_is_cut_and_said_so(self) -> None:
        text = "a" * (MAX_SCAN - 10) + "password=" + "s" * 50 + " " + "b" * 1_000_000
        out = redact(text)
        assert out.startswith("a" * (MAX_SCAN - 10) + "password=" + MASK), "the key ends a word"
        assert "s" * 10 not in out, "a secret across the cut is masked whole"
        assert out.endswith(f"... [{len(text) - MAX_SCAN} more characters not logged]")
        assert len(out) < MAX_SCAN + LOOKAHEAD

    def test_megabyte_of_hostile_text(self) -> None:
        for text in HOSTILE.values():
            big = text * (1_000_000 // len(text) + 1)
            assert len(redact(big)) < 2 * MAX_SCAN, "masks are longer than one-letter values"


class TestMasking:
    """What is masked stays masked (the cases the regexes handled, and a few more)."""

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("x redis://:pw@h:1/0 y", f"x redis://:{MASK}@h:1/0 y"),
            ("amqp://guest:gpw@rabbit//", f"amqp://guest:{MASK}@rabbit//"),
            ('{"password": "a\\"b", "n": 1}', f'{{"password": "{MASK}", "n": 1}}'),
            ("Authorization: Bearer abc.def", f"Authorization: Bearer {MASK}"),
            ("x-api-key=k1&y=2", f"x-api-key={MASK}&y=2"),
            ("token=", "token="),
            ("redis://h:6379/0 and redis://:@h", "redis://h:6379/0 and redis://:@h"),
            ("args {'password': 'hunter2-cut-short...", f"args {{'password': '{MASK}"),
            (
                'msg {\\"password\\": \\"x-secret\\", \\"n\\": 1}',
                f'msg {{\\"password\\": \\"{MASK}\\", \\"n\\": 1}}',
            ),
        ],
    )
    def test_cases(self, text: str, expected: str) -> None:
        assert redact(text) == expected

    @given(secret=st.text(alphabet="abcdefghijk0123456789.~", min_size=4, max_size=40))
    def test_a_keyed_secret_never_survives(self, secret: str) -> None:
        for text in (f"password={secret}", f"'token': '{secret}'", f"redis://u:{secret}@h"):
            assert secret not in redact(text)

    def test_nesting_is_bounded(self) -> None:
        value: list[object] = []
        for _ in range(10_000):
            value = [value]
        out = redact_value(value)
        depth = 0
        while isinstance(out, list):
            out, depth = out[0], depth + 1
        assert out == "<nested too deeply>" and depth == 20
