"""What the fleet tells its operators: metrics, traces, logs, health, probes and alerts.

metrics        per-process task and policy-event counters (Prometheus multiprocess mode)
fleet_metrics  the fleet gauges, from one `workers.fleet` snapshot
tracing        OpenTelemetry per process; policy decisions as span events
logs           JSON lines with task and trace ids; secrets masked
eventlog       policy events as log lines
health         fleet health checks over a snapshot, and their stored results
probes         /healthz and /readyz of a worker and of beat
http           the small HTTP server each process runs
alerts/        rules over a snapshot, plan, store and sinks
"""
