"""Bulwark's resilience policies: framework-agnostic, state shared through Redis.

Nothing here imports Celery, prometheus_client or opentelemetry. Policies report
what happens to them as events (see `policies.events`); the worker tier turns
those into metrics, spans, logs and alerts.
"""
