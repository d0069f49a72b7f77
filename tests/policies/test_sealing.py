"""Sealing: AES-256-GCM payloads bound to their message, under a rotating key ring."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.sealing import KeyFileError, KeyRing, SealError, open_sealed, seal

NOW = 1_700_000_000.0
AAD = {
    "task": "payments.charge",
    "task_id": "0b6c1c1e-5d1f-4e0a-9d1a-6f7e6b1c2a3d",
    "producer": "checkout",
    "jti": "j-0001",
}
PLAIN = b'{"card":"tok_4242","amount":1250}'


def _blob(token: str) -> tuple[str, bytes]:
    """The `v1.<kid>.` prefix and the decoded nonce+ciphertext of a token."""
    prefix, body = token.rsplit(".", 1)
    return prefix, base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))


def _token(prefix: str, blob: bytes) -> str:
    return f"{prefix}.{base64.urlsafe_b64encode(blob).rstrip(b'=').decode()}"


class TestSealOpen:
    """A sealed payload opens with the same ring and associated data, and only then."""

    def test_round_trip(self) -> None:
        ring = KeyRing.new(NOW)
        token = seal(ring, PLAIN, AAD, NOW)
        version, kid, _ = token.split(".")
        assert (version, kid) == ("v1", ring.active.kid)
        assert open_sealed(ring, token, AAD, NOW) == PLAIN
        assert open_sealed(ring, seal(ring, b"", AAD, NOW), AAD, NOW) == b""

    def test_no_plaintext_in_the_token_and_a_fresh_nonce_each_time(self) -> None:
        ring = KeyRing.new(NOW)
        first, second = seal(ring, PLAIN, AAD, NOW), seal(ring, PLAIN, AAD, NOW)
        assert first != second
        assert _blob(first)[1][:12] != _blob(second)[1][:12]
        assert b"tok_4242" not in _blob(first)[1]

    def test_a_flipped_bit_anywhere_fails(self) -> None:
        ring = KeyRing.new(NOW)
        prefix, blob = _blob(seal(ring, PLAIN, AAD, NOW))
        for bit in range(len(blob) * 8):  # nonce, ciphertext and tag
            changed = bytearray(blob)
            changed[bit // 8] ^= 1 << (bit % 8)
            with pytest.raises(SealError, match="authentication failed") as info:
                open_sealed(ring, _token(prefix, bytes(changed)), AAD, NOW)
            assert info.value.reason == "authentication"

    def test_a_truncated_or_extended_ciphertext_fails(self) -> None:
        ring = KeyRing.new(NOW)
        prefix, blob = _blob(seal(ring, PLAIN, AAD, NOW))
        for changed in (blob[:-1], blob + b"\0"):
            with pytest.raises(SealError) as info:
                open_sealed(ring, _token(prefix, changed), AAD, NOW)
            assert info.value.reason == "authentication"

    @pytest.mark.parametrize("field", ["task", "task_id", "producer", "jti"])
    def test_moved_to_another_message_fails(self, field: str) -> None:
        ring = KeyRing.new(NOW)
        token = seal(ring, PLAIN, AAD, NOW)
        with pytest.raises(SealError, match="another message") as info:
            open_sealed(ring, token, {**AAD, field: AAD[field] + "x"}, NOW)
        assert info.value.reason == "authentication"

    def test_a_missing_or_extra_aad_field_fails(self) -> None:
        ring = KeyRing.new(NOW)
        token = seal(ring, PLAIN, AAD, NOW)
        fewer = {k: v for k, v in AAD.items() if k != "jti"}
        for aad in (fewer, {**AAD, "extra": ""}):
            with pytest.raises(SealError, match="authentication failed"):
                open_sealed(ring, token, aad, NOW)

    def test_aad_order_does_not_matter(self) -> None:
        ring = KeyRing.new(NOW)
        token = seal(ring, PLAIN, AAD, NOW)
        assert open_sealed(ring, token, dict(reversed(AAD.items())), NOW) == PLAIN

    def test_the_key_id_is_bound_whether_named_or_not(self) -> None:
        ring = KeyRing.new(NOW)
        kid = ring.active.kid
        token = seal(ring, PLAIN, {**AAD, "kid": kid}, NOW)
        assert open_sealed(ring, token, AAD, NOW) == PLAIN
        with pytest.raises(SealError, match="kid") as info:
            seal(ring, PLAIN, {**AAD, "kid": "k000000000000"}, NOW)
        assert info.value.reason == "bad_aad"

    def test_another_ring_does_not_know_the_key(self) -> None:
        token = seal(KeyRing.new(NOW), PLAIN, AAD, NOW)
        with pytest.raises(SealError, match="does not hold") as info:
            open_sealed(KeyRing.new(NOW), token, AAD, NOW)
        assert info.value.reason == "unknown_key"

    @pytest.mark.parametrize(
        "token",
        [
            "",
            "v1",
            "v1.kabc",
            "v2.k0123456789ab.AAAA",
            "v1.K0123456789AB.AAAA",
            "v1.k0123456789ab.not base64!",
            "v1.k0123456789ab.AAAA",  # shorter than nonce and tag
            "v1.k0123456789ab.AAAA.AAAA",
        ],
    )
    def test_malformed_tokens_are_refused_by_name(self, token: str) -> None:
        with pytest.raises(SealError, match="malformed sealed token") as info:
            open_sealed(KeyRing.new(NOW), token, AAD, NOW)
        assert info.value.reason == "malformed"

    def test_another_text_for_the_same_bytes_is_refused(self) -> None:
        """The spare bits of the last base64 character must be zero: one token, one text."""
        ring = KeyRing.new(NOW)
        token = seal(ring, PLAIN, AAD, NOW)
        prefix, body = token.rsplit(".", 1)
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        spare = {2: 0b1111, 3: 0b11}.get(len(body) % 4, 0)
        if not spare:
            pytest.skip("this payload length has no spare bits")
        last = alphabet[alphabet.index(body[-1]) | 1]
        with pytest.raises(SealError, match="malformed"):
            open_sealed(ring, f"{prefix}.{body[:-1]}{last}", AAD, NOW)

    def test_errors_never_show_plaintext_or_key_bytes(self) -> None:
        ring = KeyRing.new(NOW)
        token = seal(ring, PLAIN, AAD, NOW)
        assert ring.active.secret is not None
        secret = base64.b64encode(ring.active.secret).decode()
        for aad in ({**AAD, "jti": "other"}, AAD):
            for bad in (token[:-2], token + "A", _token(*_blob(token)[:1], b"\0" * 40)):
                try:
                    open_sealed(ring, bad, aad, NOW)
                except SealError as exc:
                    text = f"{exc} {exc!r}"
                    assert "tok_4242" not in text
                    assert secret not in text
                    assert _blob(token)[1].hex() not in text


class TestRotation:
    """After a rotation the old key opens what it sealed until its overlap ends, then never."""

    def test_new_seals_use_the_new_key(self) -> None:
        ring = KeyRing.new(NOW)
        rotated = ring.rotate(NOW + 10, overlap_seconds=3600)
        assert rotated.active.kid != ring.active.kid
        assert seal(rotated, PLAIN, AAD, NOW + 10).split(".")[1] == rotated.active.kid
        assert ring.active.state == "active", "rotate returns a new ring; the old one is unchanged"

    def test_old_key_opens_inside_the_overlap_and_not_after(self) -> None:
        ring = KeyRing.new(NOW)
        old_token = seal(ring, PLAIN, AAD, NOW)
        rotated = ring.rotate(NOW + 100, overlap_seconds=60)
        assert open_sealed(rotated, old_token, AAD, NOW + 100) == PLAIN
        assert open_sealed(rotated, old_token, AAD, NOW + 159.9) == PLAIN
        with pytest.raises(SealError, match="retired") as info:
            open_sealed(rotated, old_token, AAD, NOW + 160)  # the deadline itself: retired
        assert info.value.reason == "retired_key"
        # `expire` makes it so for good: a clock going back does not revive the key.
        expired = rotated.expire(NOW + 160)
        assert expired.get(ring.active.kid).state == "retired"  # type: ignore[union-attr]
        with pytest.raises(SealError, match="retired"):
            open_sealed(expired, old_token, AAD, NOW + 100)

    def test_expire_leaves_keys_inside_their_overlap(self) -> None:
        ring = KeyRing.new(NOW).rotate(NOW, 60).rotate(NOW + 30, 60)
        states = [k.state for k in ring.expire(NOW + 61).keys]
        assert states == ["retired", "decrypting", "active"]

    def test_a_retired_key_error_names_the_kid(self) -> None:
        ring = KeyRing.new(NOW)
        old = ring.active.kid
        token = seal(ring, PLAIN, AAD, NOW)
        retired = ring.rotate(NOW, overlap_seconds=3600).retire(old)
        with pytest.raises(SealError, match=f"key {old}, which is retired") as info:
            open_sealed(retired, token, AAD, NOW + 1)
        assert info.value.reason == "retired_key"
        assert retired.get(old).secret is None  # type: ignore[union-attr]

    def test_the_active_key_cannot_be_retired(self) -> None:
        ring = KeyRing.new(NOW)
        with pytest.raises(ValueError, match="rotate before retiring"):
            ring.retire(ring.active.kid)
        with pytest.raises(KeyError, match="k000000000000"):
            ring.retire("k000000000000")

    @pytest.mark.parametrize("overlap", [-1.0, float("nan"), float("inf")])
    def test_a_bad_overlap_is_refused(self, overlap: float) -> None:
        with pytest.raises(ValueError, match="overlap_seconds"):
            KeyRing.new(NOW).rotate(NOW, overlap)


_steps = st.lists(
    st.one_of(
        st.tuples(st.just("rotate"), st.floats(0, 1000), st.floats(0, 1000)),
        st.tuples(st.just("retire"), st.integers(0, 20), st.just(0.0)),
        st.tuples(st.just("expire"), st.floats(0, 1000), st.just(0.0)),
    ),
    max_size=30,
)


class TestRingInvariants:
    """Whatever operators do, a ring has exactly one active key and survives a file."""

    @settings(max_examples=150, deadline=None)
    @given(_steps)
    def test_exactly_one_active_key_after_any_sequence(
        self, steps: list[tuple[str, float, float]]
    ) -> None:
        ring = KeyRing.new(0.0)
        now = 0.0
        for op, a, b in steps:
            if op == "rotate":
                now += a
                ring = ring.rotate(now, overlap_seconds=b)
            elif op == "expire":
                now += a
                ring = ring.expire(now)
            else:
                kid = ring.keys[int(a) % len(ring.keys)].kid
                try:
                    ring = ring.retire(kid)
                except ValueError:
                    assert kid == ring.active.kid
            assert [k.state for k in ring.keys].count("active") == 1
            assert len(set(ring.kids)) == len(ring.keys)
            for key in ring.keys:
                assert (key.secret is None) == (key.state == "retired")
            assert KeyRing.from_json(ring.to_json()) == ring
            token = seal(ring, b"x", {}, now)
            assert open_sealed(ring, token, {}, now) == b"x"

    def test_json_round_trip_keeps_keys_and_states(self) -> None:
        ring = KeyRing.new(NOW).rotate(NOW + 1, 60).rotate(NOW + 2, 60)
        ring = ring.retire(ring.keys[0].kid)
        again = KeyRing.from_json(ring.to_json())
        assert again == ring
        assert [k.secret for k in again.keys] == [k.secret for k in ring.keys]
        token = seal(ring, PLAIN, AAD, NOW + 3)
        assert open_sealed(again, token, AAD, NOW + 3) == PLAIN

    @pytest.mark.parametrize(
        ("edit", "message"),
        [
            (lambda d: d["keys"].append({**d["keys"][0], "state": "retired", "key": None}), "once"),
            (lambda d: d["keys"][0].update(state="decrypting"), "exactly one active"),
            (lambda d: d["keys"][0].update(kid="k000000000000"), "do not match"),
            (lambda d: d["keys"][0].update(key="AAAA"), "32 key bytes"),
            (lambda d: d["keys"][0].update(key="not base64!"), "not valid base64"),
            (lambda d: d.update(format="other"), "not a key ring"),
            (lambda d: d.update(version=2), "not supported"),
        ],
    )
    def test_a_bad_file_is_refused_without_showing_keys(self, edit: object, message: str) -> None:
        ring = KeyRing.new(NOW)
        document = json.loads(ring.to_json())
        edit(document)  # type: ignore[operator]
        with pytest.raises(KeyFileError, match=message) as info:
            KeyRing.from_json(json.dumps(document))
        assert ring.active.secret is not None
        assert base64.b64encode(ring.active.secret).decode() not in str(info.value)

    def test_repr_shows_kids_and_states_never_key_material(self) -> None:
        ring = KeyRing.new(NOW).rotate(NOW, 60)
        shown = f"{ring!r} {ring} {ring.keys!r} {ring.active!r}"
        for key in ring.keys:
            assert key.kid in shown
            assert key.secret is not None
            for encoding in (
                base64.b64encode(key.secret).decode(),
                base64.urlsafe_b64encode(key.secret).decode(),
                key.secret.hex(),
                repr(key.secret),
            ):
                assert encoding not in shown
        assert "active" in shown and "decrypting" in shown


class TestKeyFile:
    """A key file is written atomically at mode 0600 and read only if nobody else can."""

    def test_save_writes_mode_0600_and_load_reads_it_back(self, tmp_path: Path) -> None:
        path = tmp_path / "keys.json"
        ring = KeyRing.new(NOW).rotate(NOW, 60)
        old_umask = os.umask(0o000)  # even a permissive umask does not widen the mode
        try:
            ring.save(path)
        finally:
            os.umask(old_umask)
        assert path.stat().st_mode & 0o777 == 0o600
        assert KeyRing.load(path) == ring
        assert [p.name for p in tmp_path.iterdir()] == ["keys.json"], "no temporary file left"

    def test_save_replaces_an_existing_file(self, tmp_path: Path) -> None:
        path = tmp_path / "keys.json"
        first = KeyRing.new(NOW)
        first.save(path)
        second = first.rotate(NOW + 1, 60)
        second.save(path)
        assert KeyRing.load(path) == second

    @pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
    def test_load_refuses_a_file_others_may_access(self, tmp_path: Path, mode: int) -> None:
        path = tmp_path / "keys.json"
        KeyRing.new(NOW).save(path)
        path.chmod(mode)
        with pytest.raises(KeyFileError) as info:
            KeyRing.load(path)
        message = str(info.value)
        assert str(path) in message
        assert f"{mode:04o}" in message
        assert "chmod 600" in message

    @pytest.mark.parametrize("mode", [0o600, 0o400])
    def test_load_accepts_owner_only_modes(self, tmp_path: Path, mode: int) -> None:
        path = tmp_path / "keys.json"
        ring = KeyRing.new(NOW)
        ring.save(path)
        path.chmod(mode)
        assert KeyRing.load(path) == ring

    def test_load_names_the_file_of_a_bad_ring(self, tmp_path: Path) -> None:
        path = tmp_path / "keys.json"
        path.write_text("{not json")
        path.chmod(0o600)
        with pytest.raises(KeyFileError, match=f"key file {path}: key ring is not valid JSON"):
            KeyRing.load(path)
