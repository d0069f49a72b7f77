"""Prometheus metrics (multiprocess mode), built after the worker forks. (issue 4: in progress)"""
