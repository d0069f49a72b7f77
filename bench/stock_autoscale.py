"""The Bulwark app with Celery's own pool autoscaler, for `bench/autoscale.py`'s comparison:
`celery -A bench.stock_autoscale worker --autoscale=MAX,MIN`."""

from __future__ import annotations

from workers.app import app

app.conf.worker_autoscaler = "celery.worker.autoscale:Autoscaler"

__all__ = ["app"]
