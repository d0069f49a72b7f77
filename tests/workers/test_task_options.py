"""ResilientTask options are checked when a task is declared, not when it first runs."""

from __future__ import annotations

import pytest

from policies.errors import PolicyConfigError
from workers.app import app
from workers.guard import guard_for
from workers.registry import registry
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

        task = app.task(
            name="t.ok", base=ResilientTask, breaker="payments", bulkhead="payments", acks_late=True
        )(body)
        assert (task.breaker, task.bulkhead, task.service, task.acks_late) == (
            "payments",
            "payments",
            None,
            True,
        )

    def test_the_budget_defaults_to_the_breakers_name(self) -> None:
        registry.breaker("t-dep")
        task = app.task(name="t.budget", base=ResilientTask, breaker="t-dep")(body)
        assert task.budget is None
        assert registry.require("budget", "t-dep").overrides == {}, "declared with the defaults"
        assert guard_for(task).budget is not None
        assert guard_for(task).budget.name == "t-dep"

    def test_no_breaker_no_budget(self) -> None:
        task = app.task(name="t.nobudget", base=ResilientTask)(body)
        assert guard_for(task).budget is None
