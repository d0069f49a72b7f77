"""Jobs other services enqueue by name with `send_task`.

A task named `<queue>.<job>` runs on the `<queue>` bulkhead queue; anything else
runs on `default`. Each job goes through its dependency's policies
(`tasks.policies`): breaker, bulkhead, degradation level, retry budget.
A balanced job (`shipping.label`) goes to one of its shard queues instead
(`workers.balancing`); producers that only know its name learn its shards from Redis.
"""

from __future__ import annotations

from typing import Any

from policies import keys
from policies.routing import Balance
from tasks.dependencies import dependency
from tasks.policies import INVENTORY, NOTIFICATIONS, PAYMENTS
from workers.app import app
from workers.caching import cached
from workers.resources import policy_redis
from workers.task import ResilientTask

#: Seconds a stock level stays cached (L1 and L2).
STOCK_TTL = 60.0
#: The shard queues of the carrier's label service: all labels of one order on one shard,
#: in the order they were asked for.
SHIPPING = ("shipping.0", "shipping.1")


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


@app.task(name="catalog.stock")
def stock(sku: str) -> dict[str, Any]:
    """The stock level of a SKU, looked up through the fleet's tiered cache (L1 in this
    process, L2 in Redis): the catalog is asked only on a miss."""
    level = cached("catalog.stock", ttl=STOCK_TTL).get_or_fill(
        sku, lambda: {"level": int(dependency("catalog").call("stock", sku=sku), 16) % 100}
    )
    return {"sku": sku, **level}


@app.task(name="shipping.label",
          balance=Balance(strategy="consistent_hash", targets=SHIPPING,
                          key="order_id"))  # fmt: skip
def label(order_id: str, parcel: int) -> dict[str, Any]:
    """Print a shipping label for one parcel of an order, on the order's shard."""
    dependency("shipping").call("label", order_id=order_id, parcel=parcel)
    return {"order_id": order_id, "parcel": parcel}


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
