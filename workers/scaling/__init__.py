"""Scaling: the pool autoscaler of a worker (`--autoscale`), fed by the fleet snapshot.

The decision itself is `policies.autoscale` (pure); this package gathers its
inputs (`load`) and applies it to a Celery pool (`autoscaler`).
"""
