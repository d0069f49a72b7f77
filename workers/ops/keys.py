"""`bulwark keys`: identities and their signing keys, in the trust store.

    bulwark keys init                                  development keys (what `bulwark up` makes)
    bulwark keys new-producer NAME --allow 'payments.*' [--queue Q] [--max-payload N] [--rate R]
    bulwark keys rotate NAME [--overlap SECONDS]       a new key; the old one ends after the overlap
    bulwark keys revoke KEY_ID                         refused fleet-wide within 2 s
    bulwark keys data-rotate [--overlap S] | data-retire KEY_ID   the data (encryption) keys
    bulwark keys root-init | publish [--root-key PATH]   a trust store in Redis, signed (many hosts)
    bulwark keys list [--json]

The trust store is BULWARK_TRUST_FILE (default: trust.toml in the keys folder,
BULWARK_KEYS_DIR or .bulwark/keys); private keys are written there, mode 0600.
Workers re-read the trust store when it changes. Each change is audited.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from policies.audit import Action
from policies.sealing import KeyRing
from policies.trust import PUBLISHED, ROLES, TrustError, publish_value, read_published
from workers.resources import policy_redis
from workers.security.audit import record
from workers.security.keys import (
    KeyFileError,
    add_identity,
    dev_keys,
    load_private_key,
    read_trust,
    write_key_pair,
    write_trust,
)
from workers.settings import get_settings

__all__ = ["register"]


def _folder() -> Path:
    return get_settings().keys_folder


def _trust_file() -> Path:
    given = get_settings().security.trust_file
    return Path(given) if given else _folder() / "trust.toml"


def _env_lines(identity: str, key_file: Path) -> str:
    return (
        f"  BULWARK_TRUST_FILE={_trust_file().resolve()}\n"
        f"  BULWARK_IDENTITY={identity}\n"
        f"  BULWARK_SIGNING_KEY_FILE={key_file.resolve()}"
    )


def _cmd_init(args: argparse.Namespace) -> int:
    keys = dev_keys(_folder())
    print(f"development keys in {_folder().resolve()}: identities worker, operator, demo")
    print(f"audit key {keys.audit_key.resolve()} (public: {keys.audit_public_key.resolve()})")
    return 0


def _cmd_new(args: argparse.Namespace) -> int:
    if not args.allow:
        raise KeyFileError("say what it may send: --allow 'payments.*' (deny by default)")
    kid, key_file = add_identity(
        _trust_file(),
        _folder(),
        args.name,
        role=args.role,
        tasks=tuple(args.allow),
        queues=tuple(args.queue),
        max_payload=args.max_payload,
        rate=args.rate,
    )
    record(Action.KEY_CREATED, actor="operator", identity=args.name, kid=kid)
    print(f"identity {args.name} ({args.role}) may send {', '.join(args.allow)}; key {kid}")
    print("give its process:\n" + _env_lines(args.name, key_file))
    return 0


def _cmd_rotate(args: argparse.Namespace) -> int:
    store = read_trust(_trust_file())
    old = store.identity(args.name)
    if old is None:
        raise KeyFileError(f"no identity {args.name!r} in {_trust_file()}")
    kid, key_file = add_identity(_trust_file(), _folder(), args.name, role=old.role)
    ends = datetime.now(UTC) + timedelta(seconds=args.overlap)
    store = read_trust(_trust_file())
    ident = store.identity(args.name)
    assert ident is not None
    keys = tuple(
        replace(k, not_after=min(ends, k.not_after or ends)) if k.id != kid else k
        for k in ident.keys
    )
    write_trust(_trust_file(), store.with_identity(replace(ident, keys=keys)))
    record(Action.KEY_ROTATED, actor="operator", identity=args.name, kid=kid)
    print(f"identity {args.name}: new key {kid}; older keys end {ends:%Y-%m-%d %H:%M:%S} UTC")
    print("give its process:\n" + _env_lines(args.name, key_file))
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    try:
        store = read_trust(_trust_file()).revoke(args.kid)
    except TrustError as exc:
        raise KeyFileError(str(exc)) from None
    write_trust(_trust_file(), store)
    record(Action.KEY_REVOKED, actor="operator", kid=args.kid)
    print(f"key {args.kid} revoked: every worker refuses it within 2 s")
    return 0


def _data_keys() -> Path:
    given = get_settings().security.data_keys_file
    return Path(given) if given else _folder() / "data-keys.json"


def _cmd_data_rotate(args: argparse.Namespace) -> int:
    path = _data_keys()
    ring = KeyRing.load(path).rotate(time.time(), args.overlap)
    ring.save(path)
    record(Action.KEY_ROTATED, actor="operator", kid=ring.active.kid, kind="data")
    print(f"data key {ring.active.kid} encrypts from now; older keys decrypt for "
          f"{args.overlap:g} s more")  # fmt: skip
    return 0


def _cmd_data_retire(args: argparse.Namespace) -> int:
    path = _data_keys()
    try:
        ring = KeyRing.load(path).retire(args.kid)
    except KeyError:
        raise KeyFileError(f"no data key {args.kid!r} in {path}") from None
    except ValueError as exc:
        raise KeyFileError(str(exc)) from None
    ring.save(path)
    record(Action.KEY_REVOKED, actor="operator", kid=args.kid, kind="data")
    print(f"data key {args.kid} retired: what it sealed no longer opens")
    return 0


def _cmd_root_init(args: argparse.Namespace) -> int:
    private, public = _folder() / "root.pem", _folder() / "root.pub.pem"
    if private.exists():
        raise KeyFileError(f"{private} exists: a fleet has one root key")
    write_key_pair(private, public)
    print(f"admin root key {private.resolve()} (keep it offline)")
    print(f"workers trust what it signs: BULWARK_TRUST_ROOT_KEY_FILE={public.resolve()}")
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    root = load_private_key(args.root_key or _folder() / "root.pem")  # KeyFileError if unsafe
    store = read_trust(_trust_file())
    client = policy_redis()
    current = client.get(PUBLISHED)
    found = read_published(root.public_key(), current) if current is not None else None
    version = (found[1] if isinstance(found, tuple) else 0) + 1
    client.set(PUBLISHED, publish_value(root, store, version))
    record(Action.KEY_ROTATED, actor="operator", kind="trust store", version=str(version))
    print(f"trust store version {version} published: every worker reading it has it "
          "within 2 s")  # fmt: skip
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    store = read_trust(_trust_file())
    rows = [
        {
            "identity": ident.name,
            "role": ident.role,
            "tasks": list(ident.grant.tasks),
            "queues": list(ident.grant.queues),
            "key": k.id,
            "state": k.problem(datetime.now(UTC)) or "valid",
        }
        for ident in sorted(store.identities.values(), key=lambda i: i.name)
        for k in ident.keys
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        tasks = ",".join(row["tasks"]) or "(nothing)"  # type: ignore[arg-type]
        print(f"{row['identity']:16} {row['role']:9} {row['key']:18} {row['state']:28} {tasks}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("keys", help="identities and signing keys (the trust store)")
    ksub = p.add_subparsers(dest="action", required=True)
    k = ksub.add_parser("init", help="make the development keys (worker, operator, demo, audit)")
    k.set_defaults(func=_cmd_init)
    k = ksub.add_parser("new-producer", help="a new identity that may send what --allow says")
    k.add_argument("name")
    k.add_argument("--allow", action="append", default=[], metavar="TASK_GLOB")
    k.add_argument("--queue", action="append", default=[], metavar="QUEUE_GLOB")
    k.add_argument("--max-payload", type=int, default=None, metavar="BYTES")
    k.add_argument("--rate", type=float, default=None, metavar="PER_SECOND")
    k.add_argument("--role", choices=ROLES, default="producer")
    k.set_defaults(func=_cmd_new)
    k = ksub.add_parser("rotate", help="a new key for NAME; its older keys end after --overlap")
    k.add_argument("name")
    k.add_argument("--overlap", type=float, default=3600.0, metavar="SECONDS")
    k.set_defaults(func=_cmd_rotate)
    k = ksub.add_parser("revoke", help="refuse a key fleet-wide")
    k.add_argument("kid", metavar="KEY_ID")
    k.set_defaults(func=_cmd_revoke)
    k = ksub.add_parser("data-rotate", help="a new data (encryption) key; older ones decrypt "
                        "for --overlap seconds")  # fmt: skip
    k.add_argument("--overlap", type=float, default=24 * 3600.0, metavar="SECONDS")
    k.set_defaults(func=_cmd_data_rotate)
    k = ksub.add_parser("data-retire", help="retire a data key now")
    k.add_argument("kid", metavar="KEY_ID")
    k.set_defaults(func=_cmd_data_retire)
    k = ksub.add_parser("root-init", help="make the admin root key that signs published stores")
    k.set_defaults(func=_cmd_root_init)
    k = ksub.add_parser("publish", help="publish the trust store in Redis, signed by the root key")
    k.add_argument("--root-key", default=None, metavar="PATH")
    k.set_defaults(func=_cmd_publish)
    k = ksub.add_parser("list", help="identities, keys and their state")
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=_cmd_list)
