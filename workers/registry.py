"""Declared policies: which breakers, bulkheads and services exist, by name.

Task modules declare the policies they use before they define tasks::

    registry.breaker("payments", open_timeout=10.0)
    registry.bulkhead("payments", limit=4)
    registry.service("payments")

A task that names an undeclared policy, or passes an option Bulwark does not
know, fails when it is decorated (at import), not when it first runs. The
policy objects themselves are built per process on first use (after fork),
from the settings' defaults plus the declared overrides.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from policies.errors import PolicyConfigError

KINDS = ("breaker", "bulkhead", "service", "budget")


@dataclass(frozen=True, slots=True)
class Declaration:
    kind: str
    name: str
    overrides: Mapping[str, Any] = field(default_factory=dict)


class PolicyRegistry:
    """Names and overrides of every policy the task catalogue uses."""

    def __init__(self) -> None:
        self._declared: dict[tuple[str, str], Declaration] = {}
        self._built: dict[tuple[int, str, str], Any] = {}
        self._lock = threading.Lock()

    def _declare(self, kind: str, name: str, overrides: Mapping[str, Any]) -> str:
        key = (kind, name)
        existing = self._declared.get(key)
        if existing is not None and existing.overrides != overrides:
            raise PolicyConfigError(f"{kind} {name!r} is declared twice with different options")
        self._declared[key] = Declaration(kind, name, dict(overrides))
        return name

    def breaker(self, name: str, **overrides: Any) -> str:
        """Declare a circuit breaker; `overrides` are `BreakerConfig` fields."""
        return self._declare("breaker", name, overrides)

    def bulkhead(self, name: str, **overrides: Any) -> str:
        """Declare a fleet-wide concurrency limit; `overrides` are `BulkheadConfig` fields."""
        return self._declare("bulkhead", name, overrides)

    def service(self, name: str, **overrides: Any) -> str:
        """Declare a service with degradation levels."""
        return self._declare("service", name, overrides)

    def budget(self, name: str, **overrides: Any) -> str:
        """Declare a fleet-wide retry budget."""
        return self._declare("budget", name, overrides)

    def declared(self, kind: str) -> list[Declaration]:
        return [d for (k, _), d in sorted(self._declared.items()) if k == kind]

    def require(self, kind: str, name: str) -> Declaration:
        """The declaration of `kind` `name`; a clear error if there is none."""
        if kind not in KINDS:
            raise PolicyConfigError(f"unknown policy kind {kind!r}; known: {', '.join(KINDS)}")
        found = self._declared.get((kind, name))
        if found is None:
            known = ", ".join(d.name for d in self.declared(kind)) or "none"
            raise PolicyConfigError(
                f"unknown {kind} {name!r}: declare it with registry.{kind}({name!r}) "
                f"before the task that uses it (declared: {known})"
            )
        return found

    def ensure(self, kind: str, name: str) -> Declaration:
        """The declaration of `kind` `name`, declared with no overrides if there is none."""
        found = self._declared.get((kind, name))
        if found is None:
            self._declare(kind, name, {})
            found = self._declared[(kind, name)]
        return found

    def build(self, kind: str, name: str, factory: Callable[[Declaration], Any]) -> Any:
        """The policy object of `kind` `name` in this process, built once per process."""
        key = (os.getpid(), kind, name)
        built = self._built.get(key)
        if built is None:
            with self._lock:
                built = self._built.get(key)
                if built is None:
                    built = self._built[key] = factory(self.require(kind, name))
        return built

    def forget_built(self) -> None:
        """Drop built objects (tests that change settings)."""
        with self._lock:
            self._built.clear()


#: The registry of the task catalogue.
registry = PolicyRegistry()
