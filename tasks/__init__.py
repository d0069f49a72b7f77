"""Bulwark's task catalogue: the jobs other services enqueue by name."""
