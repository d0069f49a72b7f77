"""Lua scripts shipped as package data (`policies/lua/*.lua`), registered once per client."""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import redis


@functools.cache
def source(name: str) -> str:
    """The text of `policies/lua/<name>.lua`."""
    return resources.files("policies").joinpath("lua", f"{name}.lua").read_text("utf-8")


class Scripts:
    """Registers scripts on one client the first time each is used.

    `register_script` returns an object that calls EVALSHA and falls back to
    EVAL (re-loading the script) after a server restart flushed its cache.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._registered: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        script = self._registered.get(name)
        if script is None:
            script = self._registered[name] = self._client.register_script(source(name))
        return script
