"""Jobs other services enqueue by name with `send_task`.

A task named `<queue>.<job>` runs on the `<queue>` bulkhead queue; anything else
runs on `default`. Each job goes through its dependency's policies
(`tasks.policies`): breaker, bulkhead, degradation level, retry budget.
"""

from __future__ import annotations

from typing import Any

from policies import keys
from tasks.dependencies import dependency
from tasks.policies import INVENTORY, NOTIFICATIONS, PAYMENTS
from workers.app import app
from workers.resources import policy_redis
from workers.task import ResilientTask


@app.task(name="bulwark.ping")
def ping(token: str) -> dict[str, Any]:
    """Record `token` in Redis and answer: proof that the fleet runs what it is sent."""
    client = policy_redis()
    client.rpush(keys.key("diagnostics", "ping", "tokens"), token)
    return {"token": token, "worker": ping.request.hostname}


@app.task(
    name="payments.charge",
    base=ResilientTask,
    breaker=PAYMENTS,
    bulkhead=PAYMENTS,
    service=PAYMENTS,
    budget=PAYMENTS,
    once=True,  # a charge is not idempotent: never twice for one task id
)
def charge(order_id: str, amount_cents: int) -> dict[str, Any]:
    """Charge an order through the payments gateway."""
    if amount_cents <= 0:
        raise ValueError(f"amount_cents must be positive, got {amount_cents}")
    receipt = dependency("payments").call("charge", order_id=order_id, amount_cents=amount_cents)
    return {"order_id": order_id, "receipt": receipt}


@app.task(
    name="inventory.reserve",
    base=ResilientTask,
    breaker=INVENTORY,
    bulkhead=INVENTORY,
    budget=INVENTORY,
)
def reserve(sku: str, quantity: int) -> dict[str, Any]:
    """Reserve stock for an order."""
    dependency("inventory").call("reserve", sku=sku, quantity=quantity)
    return {"sku": sku, "reserved": quantity}


def _notify_later(recipient: str, template: str) -> dict[str, Any]:
    """Fallback while notifications are degraded: keep the message for a later batch."""
    policy_redis().rpush(keys.key("demo", "notifications", "later"), f"{recipient}:{template}")
    return {"recipient": recipient, "template": template, "sent": False, "kept_for_later": True}


@app.task(
    name="notifications.send",
    base=ResilientTask,
    breaker=NOTIFICATIONS,
    bulkhead=NOTIFICATIONS,
    service=NOTIFICATIONS,
    budget=NOTIFICATIONS,
    fallback=_notify_later,
)
def send(recipient: str, template: str) -> dict[str, Any]:
    """Send a notification."""
    dependency("notifications").call("send", recipient=recipient, template=template)
    return {"recipient": recipient, "template": template, "sent": True}
