"""What the benches read off processes and redis-server: CPU, memory, commands run."""

from __future__ import annotations

import os
from pathlib import Path

import redis

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far (/proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mib(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20


def uss_mib(pid: int) -> float:
    """Memory only this process holds (private pages: /proc smaps_rollup), what one more
    pool process costs; RSS counts as well every page it shares with its parent and
    others, the libraries' code included."""
    private = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            private += int(line.split()[1])
    return private / 1024


def rss_by_mapping(pid: int) -> dict[str, float]:
    """RSS in MiB by what is mapped (a file's name, `[heap]`, `[anon]`, ...): /proc smaps."""
    found: dict[str, float] = {}
    name = "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
            name = head[5].rsplit("/", 1)[-1] if len(head) > 5 else "[anon]"
        elif line.startswith("Rss:"):
            found[name] = found.get(name, 0.0) + int(line.split()[1]) / 1024
    return found


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def commands(client: redis.Redis, field: str = "calls") -> dict[str, int]:
    """`field` (calls or usec) of every command redis-server ran so far, by name
    (INFO commandstats: a script's commands count inside and outside its EVALSHA)."""
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v[field]) for name, v in stats.items()}
