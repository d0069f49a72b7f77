"""Key files and identities: Ed25519 private keys on disk (mode 0600), the trust store.

`bulwark keys` and `bulwark up` use these; a worker only reads its own key and
the trust store. A private key file that its group or others may read is
refused: it is a secret, and a key that leaked is not an identity.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)

from policies import keyfile
from policies.authz import Grant
from policies.sealing import KeyRing
from policies.trust import Identity, KeyEntry, TrustError, TrustStore, key_id

__all__ = ["DevKeys", "KeyFileError", "add_identity", "dev_keys", "load_private_key"]


class KeyFileError(ValueError):
    """A key or trust file is missing, unsafe or malformed; the message names it."""


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """`policies.keyfile.load_private_key`, its refusals as `KeyFileError`."""
    try:
        return keyfile.load_private_key(path)
    except OSError as exc:
        raise KeyFileError(f"cannot read private key {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise KeyFileError(str(exc)) from None


def write_key_pair(private: Path, public: Path) -> Ed25519PrivateKey:
    """A new Ed25519 key: its private half in `private` (0600), its public half in `public`."""
    key = Ed25519PrivateKey.generate()
    write_private(private, key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    public.write_bytes(keyfile.public_key_pem(key))
    return key


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_trust(path: str | Path) -> TrustStore:
    path = Path(path)
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        return TrustStore()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read trust store {path}: {exc}") from None
    try:
        return TrustStore.from_toml(text)
    except TrustError as exc:
        raise KeyFileError(f"trust store {path}: {exc}") from None


def write_trust(path: str | Path, store: TrustStore) -> None:
    """Write the trust store atomically (public keys: readable, not writable, by others)."""
    path = Path(path)
    write_private(path, store.to_toml().encode())
    path.chmod(0o644)


def add_identity(
    trust_file: Path,
    keys_dir: Path,
    name: str,
    *,
    role: str = "producer",
    tasks: tuple[str, ...] = (),
    queues: tuple[str, ...] = (),
    max_payload: int | None = None,
    rate: float | None = None,
) -> tuple[str, Path]:
    """Make a key for identity `name` (new, or one more key of it), add its public key to
    the trust store; (key id, private key file)."""
    key = Ed25519PrivateKey.generate()
    kid = key_id(key.public_key())
    store = read_trust(trust_file)
    old = store.identity(name)
    if old is not None and old.role != role:
        raise KeyFileError(f"identity {name!r} exists with role {old.role!r}, not {role!r}")
    grant = old.grant if old is not None and not tasks else Grant(tasks, queues, max_payload, rate)
    if role in ("worker", "operator") and not grant.tasks:
        grant = Grant(("*",), grant.queues, grant.max_payload, grant.rate)
    entry = KeyEntry(kid, key.public_key())
    identity = Identity(name, role, grant, (old.keys if old else ()) + (entry,))
    key_file = keys_dir / f"{name}.{kid}.pem"
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    write_private(key_file, pem)
    write_trust(trust_file, store.with_identity(identity))
    return kid, key_file


@dataclass(frozen=True, slots=True)
class DevKeys:
    """Development keys for `bulwark up` and the tests: one identity per role, and the
    audit key."""

    trust_file: Path
    key_files: dict[str, Path]
    audit_key: Path
    audit_public_key: Path
    data_keys: Path

    def env(self, identity: str) -> dict[str, str]:
        """The variables a process signing as `identity` needs."""
        return {
            "BULWARK_TRUST_FILE": str(self.trust_file),
            "BULWARK_IDENTITY": identity,
            "BULWARK_SIGNING_KEY_FILE": str(self.key_files[identity]),
            "BULWARK_AUDIT_KEY_FILE": str(self.audit_key),
            "BULWARK_AUDIT_PUBLIC_KEY_FILE": str(self.audit_public_key),
            "BULWARK_DATA_KEYS_FILE": str(self.data_keys),
        }


def audit_keys(folder: Path) -> tuple[Path, Path]:
    """The audit key pair in `folder` (made once): (private, public) PEM files."""
    private, public = folder / "audit.pem", folder / "audit.pub.pem"
    if not private.exists():
        write_key_pair(private, public)
    return private, public


#: The demo producer may send the catalogue's tasks and nothing else.
DEMO_TASKS = (
    "payments.*", "inventory.*", "notifications.*", "catalog.*", "shipping.*", "bulwark.ping",
)  # fmt: skip


def dev_keys(folder: Path) -> DevKeys:
    """Keys for a worker, an operator and the demo producer in `folder` (made once)."""
    trust_file = folder / "trust.toml"
    store = read_trust(trust_file)
    files: dict[str, Path] = {}
    for name, role, tasks in (
        ("worker", "worker", ()),
        ("operator", "operator", ()),
        ("demo", "producer", DEMO_TASKS),
    ):
        stable = folder / f"{name}.pem"  # a name a container's environment can give
        existing = store.identity(name)
        if existing is not None and stable.exists():
            if tasks and existing.grant.tasks != tasks:  # the catalogue grew: grant it all
                grant = replace(existing.grant, tasks=tasks)
                write_trust(trust_file, store.with_identity(replace(existing, grant=grant)))
                store = read_trust(trust_file)
            files[name] = stable
            continue
        _kid, made = add_identity(trust_file, folder, name, role=role, tasks=tasks)
        write_private(stable, made.read_bytes())
        made.unlink()
        files[name] = stable
        store = read_trust(trust_file)
    data_keys = folder / "data-keys.json"
    if not data_keys.exists():
        KeyRing.new().save(data_keys)
    return DevKeys(trust_file, files, *audit_keys(folder), data_keys)
