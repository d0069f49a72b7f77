"""Reading Ed25519 key files: PEM, or the raw 32 key bytes in base64.

One reader for every key Bulwark keeps: the signing keys of identities, the
admin root key, the audit key. Whoever holds a private key signs; whoever
verifies needs only the public key. A private key file that its group or
others may read is refused: a key that leaked is not an identity.
"""

from __future__ import annotations

import base64
import binascii
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = ["load_private_key", "load_public_key", "public_key_pem"]


def _raw(data: bytes, path: Path, what: str) -> bytes:
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValueError(f"{path}: not an Ed25519 {what} (PEM, or 32 bytes in base64)")
    return raw


def load_public_key(path: Path | str) -> Ed25519PublicKey:
    """The Ed25519 public key in `path` (ValueError names the file if it is not one)."""
    path = Path(path)
    data = path.read_bytes()
    if data.lstrip().startswith(b"-----BEGIN"):
        key = serialization.load_pem_public_key(data)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"{path}: a {type(key).__name__}, not an Ed25519 public key")
        return key
    return Ed25519PublicKey.from_public_bytes(_raw(data, path, "public key"))


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    """The Ed25519 private key in `path`; refused if group or others may read the file.

    OSError if it cannot be read; ValueError (naming the file) if it is unsafe or not
    an unencrypted Ed25519 key.
    """
    path = Path(path)
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(
            f"private key {path} is readable by group or others (mode {stat.S_IMODE(mode):o}); "
            f"run: chmod 600 {path}"
        )
    data = path.read_bytes()
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"private key {path} is not an unencrypted PEM key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: a {type(key).__name__}, not an Ed25519 private key")
        return key
    return Ed25519PrivateKey.from_private_bytes(_raw(data, path, "private key"))


def public_key_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The PEM of the public half of `key` (to hand to whoever verifies)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
