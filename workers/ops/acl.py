"""Redis ACL users per role: what a producer, a worker and an operator may do in Redis.

    bulwark acl [--queue Q ...] [--redis-version 7.0] [--password-dir DIR] [--commands]

`users()` is pure: from the queues (and the Redis version) it returns the rules of

- `default`: off. A connection that does not authenticate can do nothing.
- `producer`: enqueue and read results, nothing else: LPUSH to the queues and their
  kombu priority sub-queues (`<queue>\\x06\\x16<n>`), the kombu binding sets, PUBLISH of
  Celery events (`/<db>.celeryev/*`), SUBSCRIBE to and GET/MGET of results
  (`celery-task-meta-*`, read-only on Redis 7). No key under `bulwark:*` but the
  published trust store (Redis 7, read-only) and the balanced tasks' declarations
  (HGETALL; read-only on Redis 7), so it cannot touch a policy's state.
- `worker`: the workers, beat and Flower: every key and channel, every command but the
  `@dangerous` ones (ACL, CONFIG, DEBUG, SHUTDOWN, FLUSHALL, KEYS, INFO, MONITOR, ...),
  with the CLIENT subcommands that name a connection given back.
- `operator`: everything (`bulwark` commands, admins).
- `demo` (`bulwark up` only, with `demo=True`): the producer's rules, and the demo's
  simulated gateway (`bulwark:{demo:*}:*`, SET and DEL; scoped by a selector on Redis 7).

Rules are `ACL SETUSER` arguments; `aclfile()` writes them as a Redis aclfile with each
password as its SHA-256 (`#<hex>`), so the file holds no password. Key patterns hold
kombu's separator bytes as they are: an aclfile line is split on spaces only.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policies import keys
from policies.trust import PUBLISHED
from workers.balancing import DECLARED_KEY
from workers.secrets import SecretFileError, read_secret_file
from workers.settings import get_settings

__all__ = [
    "Acl",
    "User",
    "aclfile",
    "commands",
    "register",
    "supported",
    "users",
]

Version = tuple[int, ...]

#: kombu's Redis transport: `Channel.sep` and `PRIORITY_STEPS` (`_q_for_pri`): priority n
#: of queue q is the list `q` for n = 0, else `q + SEP + str(n)`.
SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)

#: What a producer runs: kombu's publish (LPUSH; LLEN and EXISTS of a declare; the
#: binding sets; MULTI/EXEC of its pipelines), Celery's events (PUBLISH) and result
#: reads (GET, MGET, SUBSCRIBE), and a connection's own commands.
PRODUCER_COMMANDS = (
    "ping", "select", "auth", "hello", "multi", "exec", "discard",
    "lpush", "llen", "exists", "sadd", "smembers",
    "publish", "subscribe", "unsubscribe",
    "get", "mget", "hgetall",
)  # fmt: skip

#: The CLIENT subcommands a client library sends at connect (redis-py: SETINFO, and
#: MAINT_NOTIFICATIONS with RESP3), given to the producer and back to the worker (on
#: Redis 6, CLIENT is @dangerous whole). Nothing the workers, beat or Flower run needs
#: INFO, KEYS, CONFIG or the rest of `@dangerous`.
CONNECT = ("client|setname", "client|getname", "client|id")


def _connect(version: Version) -> tuple[str, ...]:
    """`CONNECT`, and what `version` accepts in a rule of the subcommands redis-py may send:
    Redis 6 takes any name, 7.0 and 7.1 only those they know (a command they do not know
    is answered as unknown, not refused), 7.2 knows SETINFO."""
    if tuple(version[:2]) < (7, 0):
        return (*CONNECT, "client|setinfo", "client|maint_notifications")
    return (*CONNECT, "client|setinfo") if tuple(version[:2]) >= (7, 2) else CONNECT


def supported(version: Version) -> bool:
    """Redis 6.0 and later have ACL users (channel rules from 6.2, selectors from 7.0)."""
    return tuple(version[:2]) >= (6, 0)


@dataclass(frozen=True, slots=True)
class User:
    """One ACL user: its name, whether it may log in, and its rules (`ACL SETUSER` arguments
    after `reset on`, without the password)."""

    name: str
    rules: tuple[str, ...]
    enabled: bool = True

    def setuser(self, password: str | None) -> list[str]:
        """The arguments of `ACL SETUSER` (after the command) that make this user anew."""
        if not self.enabled:
            return [self.name, "reset", "off"]
        secret = ["#" + hashlib.sha256(password.encode()).hexdigest()] if password else []
        return [self.name, "reset", "on", *secret, *self.rules]

    def line(self, password: str | None) -> str:
        """This user as an aclfile line."""
        return " ".join(["user", *self.setuser(password)])


def _glob(text: str) -> str:
    """`text` matched literally by a Redis glob pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _check(name: str) -> str:
    if not name or any(c.isspace() for c in name):
        raise ValueError(f"queue {name!r}: an ACL rule cannot hold an empty name or a space")
    return name


def queue_patterns(queues: Iterable[str]) -> list[str]:
    """Key patterns of each queue and its priority sub-queues (kombu's `_q_for_pri`)."""
    steps = "".join(str(p) for p in PRIORITY_STEPS if p)
    return [p for q in queues for p in (_glob(_check(q)), f"{_glob(q)}{SEP}[{steps}]")]


def users(
    queues: Iterable[str], *, version: Version = (7, 0), db: int = 0, demo: bool = False
) -> tuple[User, ...]:
    """The ACL users of a Bulwark Redis serving `queues` (database `db`), for `version`."""
    if not supported(version):
        raise ValueError(f"Redis {'.'.join(map(str, version))} has no ACL users (6.0 or later)")
    v7 = tuple(version[:2]) >= (7, 0)
    read = "%R~" if v7 else "~"  # no read-only keys before 7.0: the commands keep it so
    connect = _connect(version)
    all_channels: tuple[str, ...] = ("&*",) if tuple(version[:2]) >= (6, 2) else ()
    producer = (
        *("~" + p for p in queue_patterns(queues)),
        "~_kombu.binding.*",
        "~_kombu.binding_permanent.*",
        read + "celery-task-meta-*",
        # The trust store `bulwark keys publish` signs: a producer with
        # BULWARK_TRUST_ROOT_KEY_FILE reads its own grant there.
        *([read + _glob(PUBLISHED)] if v7 else []),
        # What the workers declare balanced (`workers.balancing.publish`), to route by name.
        # Before 7.0 no key is read-only: the producer's commands (no HSET, no DEL) may
        # spoil that hash (LPUSH to it before it exists), never forge a declaration.
        read + _glob(DECLARED_KEY),
        # Before 6.2 every user may use every channel.
        *(["resetchannels", f"&/{db}.celeryev/*", "&celery-task-meta-*"] if all_channels else []),
        "-@all",
        *("+" + c for c in (*PRODUCER_COMMANDS, *connect)),
    )
    given_back = ("+" + c for c in connect)
    found = [
        User("default", (), enabled=False),
        User("producer", producer),
        User("worker", ("~*", *all_channels, "+@all", "-@dangerous", *given_back)),
        User("operator", ("~*", *all_channels, "+@all")),
    ]
    if demo:
        gateway = ("~" + f"{keys.PREFIX}:{{demo:*}}:*", "+set", "+del")
        # Redis 7 scopes them with a selector; before, they join the producer's rules.
        scoped = (f"({' '.join(gateway)})",) if v7 else gateway
        found.append(User("demo", (*producer, *scoped)))
    return tuple(found)


@dataclass(frozen=True, slots=True)
class Acl:
    """What a Redis's ACL users are for (`EmbeddedRedis(acl=...)`): Bulwark's queues, the
    database, and whether the demo's user is wanted."""

    queues: tuple[str, ...]
    db: int = 0
    demo: bool = False

    def users(self, version: Version) -> tuple[User, ...]:
        return users(self.queues, version=version, db=self.db, demo=self.demo)


def aclfile(found: Sequence[User], passwords: Mapping[str, str]) -> str:
    """A Redis aclfile of `found`, each with its password (as SHA-256) from `passwords`."""
    return "".join(u.line(passwords.get(u.name)) + "\n" for u in found)


def _quoted(arg: str) -> str:
    """`arg` as redis-cli reads it: plain, or in double quotes with \\xHH escapes."""
    if re.fullmatch(r"[A-Za-z0-9_.:@~%&|+\-*/{}#()]+", arg):
        return arg
    escaped = (chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\x{b:02x}" for b in arg.encode())
    return '"' + "".join(escaped) + '"'


def commands(found: Sequence[User], passwords: Mapping[str, str]) -> str:
    """`ACL SETUSER` commands of `found`, one a line, as `redis-cli` reads them."""
    return "".join(
        " ".join(["ACL", "SETUSER", *map(_quoted, u.setuser(passwords.get(u.name)))]) + "\n"
        for u in found
    )


# -- bulwark acl -------------------------------------------------------------------------------


def _version(text: str) -> Version:
    try:
        version = tuple(int(part) for part in text.split("."))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a version: {text!r} (as 7.0 or 6.2)") from None
    if not supported(version):
        raise argparse.ArgumentTypeError(f"Redis {text} has no ACL users: 6.0 or later")
    return version


def _db(url: str) -> int:
    """The database number of a redis:// URL (0 if it names none)."""
    path = urllib.parse.urlsplit(url).path.strip("/")
    return int(path) if path.isdigit() else 0


def _cmd_acl(args: argparse.Namespace) -> int:
    settings = get_settings()
    found = users(
        args.queue or settings.all_queues,
        version=args.redis_version,
        db=_db(settings.broker) if args.db is None else args.db,
    )
    passwords = {}
    if args.password_dir:
        for user in found:
            path = Path(args.password_dir) / f"{user.name}.password"
            if user.enabled and path.exists():
                try:
                    passwords[user.name] = read_secret_file(path)
                except SecretFileError as exc:
                    print(f"bulwark acl: {exc}", file=sys.stderr)
                    return 2
    sys.stdout.write((commands if args.commands else aclfile)(found, passwords))
    missing = [u.name for u in found if u.enabled and u.name not in passwords]
    if missing:
        print(
            f"bulwark acl: no password for {', '.join(missing)}: add >PASSWORD (or "
            "#SHA256) to each, or pass --password-dir DIR holding <user>.password files",
            file=sys.stderr,
        )
    return 0


def register(sub: Any) -> None:
    """Add `bulwark acl` to the command's subparsers."""
    p = sub.add_parser(
        "acl",
        help="print the Redis ACL users (producer, worker, operator) for the configured queues",
    )
    p.add_argument("--queue", action="append", default=[], metavar="QUEUE",
                   help="a queue producers may write (repeat; default: every queue)")  # fmt: skip
    p.add_argument("--redis-version", type=_version, default=(7, 0), metavar="X.Y",
                   help="the Redis the rules are for (default 7.0; 6.0 or later)")  # fmt: skip
    p.add_argument("--db", type=int, default=None,
                   help="the broker database (default: the broker URL's)")  # fmt: skip
    p.add_argument("--password-dir", metavar="DIR",
                   help="each user's password from DIR/<user>.password (as SHA-256)")  # fmt: skip
    p.add_argument("--commands", action="store_true",
                   help="ACL SETUSER commands for redis-cli instead of an aclfile")  # fmt: skip
    p.set_defaults(func=_cmd_acl)
