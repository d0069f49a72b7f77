"""Bulwark's worker tier: the Celery runtime and what runs beside it.

At the top, the Celery runtime: `app` (the Celery app), `celeryconfig`,
`task` (`ResilientTask`), `guard` (the hot path through the policies),
`consumer` (refused messages are dead-lettered), `lifecycle` (start-up checks,
heartbeats), `registry` (declared policies), `resources` (per-process clients
and policy objects), `autodegrade`, `client` (the producer) and `settings`;
`fleet` is the one read of the fleet's state. One subpackage per concern:

    telemetry/   metrics, tracing, logs, health checks, probes, the HTTP server, alerts/
    ops/         the `bulwark` command, the supervisor, the embedded Redis

Imports point down: `ops` -> the runtime and `telemetry` -> `policies`; the
layout test (tests/test_layout.py) fails on any import circle.
"""
