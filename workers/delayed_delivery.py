"""Celery's native delayed delivery (RabbitMQ quorum queues), set up through one node.

Celery's `DelayedDelivery` consumer step declares the delay exchanges and binds every
queue to them through each URL of `broker_url` in turn, retrying a node that does not
answer for 9 s (after 1, 3 and 5 s). It runs at every start of the consumer, and losing
the node the consumer was connected to is what restarts it: a quorum queue's leader
killed in a three-node cluster kept the worker from consuming for 17 s, though a
follower led the queue within seconds. Exchanges, queues and bindings belong to the
whole cluster, so this step sets them up through the first node that answers, the one
the consumer is connected to first, and tries no node twice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from celery.worker.consumer.delayed_delivery import DelayedDelivery
from kombu.utils.url import maybe_sanitize_url, url_to_parts

__all__ = ["CELERY_STEP", "STEP", "OneNodeDelayedDelivery"]

logger = logging.getLogger(__name__)

#: Celery's step in the consumer's blueprint, and the one that takes its place.
CELERY_STEP = "celery.worker.consumer.delayed_delivery:DelayedDelivery"
STEP = "workers.delayed_delivery:OneNodeDelayedDelivery"


def nodes_in_order(urls: Iterable[str], broker_url: str, connection: Any) -> list[str]:
    """`urls`, the node `connection` is connected to first, then as `broker_url` lists them."""
    listed = [part.strip() for part in str(broker_url).split(";")]
    here = (getattr(connection, "hostname", None), getattr(connection, "port", None))

    def order(url: str) -> tuple[bool, int]:
        parts = url_to_parts(url)
        position = listed.index(url) if url in listed else len(listed)
        return (parts.hostname, parts.port) != here, position

    return sorted(urls, key=order)


class OneNodeDelayedDelivery(DelayedDelivery):  # type: ignore[misc]
    name = DelayedDelivery.name  # its place in the blueprint: Celery's step's

    def start(self, c: Any) -> None:
        app = c.app
        self._validate_configuration(app)  # raises on a bad setting, as Celery's does
        broker_url = app.conf.broker_url
        urls = self._validate_broker_urls(broker_url)
        failed = []
        for url in nodes_in_order(urls, broker_url, c.connection):
            try:
                self._setup_delayed_delivery(c, url)
                return
            except Exception as exc:  # any failure: the next node may answer
                failed.append(f"{maybe_sanitize_url(url)}: {type(exc).__name__}: {exc}")
        logger.critical("native delayed delivery could not be set up on any node (%s): "
                        "countdowns wait in the worker", "; ".join(failed))  # fmt: skip
