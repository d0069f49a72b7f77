"""Store URLs: what each names, which mixes are refused, and hostile text."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies import endpoints
from policies.endpoints import BadEndpoint, parse, problems

REDIS = "redis://127.0.0.1:6379/0"
SENTINEL = "sentinel://10.0.0.1:26379;sentinel://10.0.0.2:26379/2"
CLUSTER = "redis+cluster://10.0.0.1:7000;redis+cluster://10.0.0.2:7001"
AMQP = "amqp://guest:guest@127.0.0.1:5672/bulwark"


class TestParse:
    def test_each_engine(self) -> None:
        assert parse(REDIS).kind == "redis" and parse(REDIS).nodes == (("127.0.0.1", 6379),)
        s = parse(SENTINEL)
        assert (s.kind, s.db, s.nodes) == (
            "sentinel",
            2,
            (("10.0.0.1", 26379), ("10.0.0.2", 26379)),
        )
        c = parse(CLUSTER)
        assert (c.kind, len(c.nodes), c.tls) == ("cluster", 2, False)
        assert parse("rediss+cluster://h:7000?ssl_cert_reqs=required").tls
        assert parse(AMQP).kind == "amqp" and parse(AMQP).password == "guest"
        nodes = parse("amqp://u:p@r1:5672//;amqp://u:p@r2:5672//;amqp://u:p@r3:5673//")
        assert nodes.nodes == (("r1", 5672), ("r2", 5672), ("r3", 5673))
        assert parse("unix:///run/redis.sock?db=3").db == 3

    @pytest.mark.parametrize(
        ("url", "why"),
        [
            ("mongodb://h", "unknown scheme 'mongodb'"),
            ("redis+cluster://h:7000/1", "database 0 only"),
            ("sentinel://h", "needs host:port"),
            ("sentinel://h:1;redis://h:2", "mixes sentinel:// and redis://"),
            ("amqp://h:1;redis://h:2", "mixes amqp:// and redis://"),
            ("redis://a:1;redis://b:2", "names one server"),
            ("redis://h:99999/0", "is not a number from 0 to 65535"),
            ("redis://h:1/zero", "database 'zero' is not a number"),
            (";".join(["redis+cluster://h:1"] * 65), "at most 64"),
        ],
    )
    def test_what_is_wrong_is_named(self, url: str, why: str) -> None:
        with pytest.raises(BadEndpoint, match=why):
            parse(url)

    def test_the_password_is_never_in_the_error(self) -> None:
        with pytest.raises(BadEndpoint) as caught:
            parse("redis://user:s3cret@h:bad/0")
        assert "s3cret" not in str(caught.value)

    @given(st.text(max_size=300))
    def test_any_text_parses_or_is_refused_clearly(self, text: str) -> None:
        try:
            parse(text)
        except BadEndpoint as exc:
            assert str(exc)


class TestProblems:
    def test_every_mix_that_works(self) -> None:
        for policy in (REDIS, SENTINEL, CLUSTER):
            for broker in (REDIS, SENTINEL, AMQP):
                for backend in (REDIS, SENTINEL):
                    assert problems(policy, broker, backend) == [], (policy, broker, backend)

    def test_the_mixes_that_cannot(self) -> None:
        assert "policy store must be Redis" in problems(AMQP, AMQP, REDIS)[0]
        assert "no Redis Cluster transport" in problems(CLUSTER, CLUSTER, REDIS)[0]
        assert "cannot be the result backend" in problems(REDIS, AMQP, AMQP)[0]
        assert "cannot be the result backend" in problems(CLUSTER, REDIS, CLUSTER)[0]

    @given(
        st.sampled_from([REDIS, SENTINEL, CLUSTER, AMQP, "bogus://x"]),
        st.sampled_from([REDIS, SENTINEL, CLUSTER, AMQP, "bogus://x"]),
        st.sampled_from([REDIS, SENTINEL, CLUSTER, AMQP, "bogus://x"]),
    )
    def test_a_refused_mix_always_names_the_setting(
        self, policy: str, broker: str, backend: str
    ) -> None:
        for problem in problems(policy, broker, backend):
            assert problem.split(":", 1)[0] in (
                "REDIS_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND",
            )  # fmt: skip
        kinds = [endpoints._KINDS.get(u.split("://")[0]) for u in (policy, broker, backend)]
        fine = (
            kinds[0] in ("redis", "sentinel", "cluster")
            and kinds[1] in ("redis", "sentinel", "amqp")
            and kinds[2] in ("redis", "sentinel")
        )
        assert (problems(policy, broker, backend) == []) == fine
