"""The app with two balanced test tasks, for workers started by the balancing tests
(`celery -A tests.balanced_app worker -Q ledger.0`)."""

from __future__ import annotations

from typing import Any

from policies import keys
from policies.routing import Balance
from tasks.policies import INVENTORY
from workers.app import app
from workers.resources import policy_redis
from workers.task import ResilientTask

LEDGER = ("ledger.0", "ledger.1")
REPORTS = ("reports.0", "reports.1")
EXPORTS = ("exports.0", "exports.1")


@app.task(name="ledger.post", bind=True,
          balance=Balance(strategy="consistent_hash", targets=LEDGER, key="account"))  # fmt: skip
def post(self: Any, account: str, amount_cents: int) -> str:
    """Record which shard posted the entry, in the account's order."""
    shard = (self.request.delivery_info or {}).get("routing_key", "?")
    policy_redis().rpush(keys.key("test", "ledger", account), f"{shard}:{amount_cents}")
    return str(shard)


@app.task(name="reports.render",
          balance=Balance(strategy="least_backlog", targets=REPORTS))  # fmt: skip
def render(report: str) -> str:
    return report


@app.task(name="exports.write", balance=Balance(strategy="round_robin", targets=EXPORTS))
def write(name: str) -> str:
    return name


@app.task(name="ledger.check", base=ResilientTask, breaker=INVENTORY,
          balance=Balance(strategy="consistent_hash", targets=LEDGER, key="account"))  # fmt: skip
def check(account: str) -> str:
    """A ResilientTask balanced too: `balance=` sits beside the policy options."""
    return account


__all__ = ["app", "check", "post", "render", "write"]
