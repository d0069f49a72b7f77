"""Jobs other services enqueue by name with `send_task`.

A task named `<queue>.<job>` runs on the `<queue>` bulkhead queue; anything else
runs on `default`.
"""

from __future__ import annotations

from typing import Any

from policies import keys
from tasks.dependencies import dependency
from workers.app import app
from workers.resources import policy_redis


@app.task(name="bulwark.ping")
def ping(token: str) -> dict[str, Any]:
    """Record `token` in Redis and answer: proof that the fleet runs what it is sent."""
    client = policy_redis()
    client.rpush(keys.key("diagnostics", "ping", "tokens"), token)
    return {"token": token, "worker": ping.request.hostname}


@app.task(name="payments.charge")
def charge(order_id: str, amount_cents: int) -> dict[str, Any]:
    """Charge an order through the payments gateway."""
    if amount_cents <= 0:
        raise ValueError(f"amount_cents must be positive, got {amount_cents}")
    receipt = dependency("payments").call("charge", order_id=order_id, amount_cents=amount_cents)
    return {"order_id": order_id, "receipt": receipt}


@app.task(name="inventory.reserve")
def reserve(sku: str, quantity: int) -> dict[str, Any]:
    """Reserve stock for an order."""
    dependency("inventory").call("reserve", sku=sku, quantity=quantity)
    return {"sku": sku, "reserved": quantity}


@app.task(name="notifications.send")
def send(recipient: str, template: str) -> dict[str, Any]:
    """Send a notification."""
    dependency("notifications").call("send", recipient=recipient, template=template)
    return {"recipient": recipient, "template": template}
