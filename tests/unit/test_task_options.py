"""ResilientTask options are checked when a task is declared, not when it first runs."""

from __future__ import annotations

import pytest

from policies.errors import PolicyConfigError
from workers.app import app
from workers.task import ResilientTask


def body() -> None:
    """A task body."""


class TestDeclaration:
    """Undeclared policy names and unknown options fail at decoration, naming the problem."""

    def test_undeclared_breaker_is_named(self) -> None:
        import tasks.policies  # noqa: F401  (declares payments)

        with pytest.raises(
            PolicyConfigError, match=r"unknown breaker 'paymnets'.*declared: .*payments"
        ):
            app.task(name="t.undeclared", base=ResilientTask, breaker="paymnets")(body)

    def test_unknown_option_is_named(self) -> None:
        with pytest.raises(PolicyConfigError, match=r"unknown task option.*breakr"):
            app.task(name="t.typo", base=ResilientTask, breakr="payments")(body)

    def test_fallback_must_be_callable(self) -> None:
        with pytest.raises(PolicyConfigError, match="fallback must be callable"):
            app.task(name="t.fb", base=ResilientTask, fallback="later")(body)

    def test_declared_names_and_celery_options_pass(self) -> None:
        import tasks.policies  # noqa: F401  (declares payments)

        app.task(
            name="t.ok", base=ResilientTask, breaker="payments", bulkhead="payments", acks_late=True
        )(body)
