"""OpenTelemetry tracing, set up per process after fork. (issue 4: in progress)"""
