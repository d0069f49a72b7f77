"""Reading the audit key pair: PEM, or the raw 32 key bytes in base64.

Writers hold the private key (they sign checkpoints); whoever verifies needs
only the public key, so an auditor can check the log without being able to
forge it.
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
    """The audit public key in `path` (ValueError names the file if it is not one)."""
    path = Path(path)
    data = path.read_bytes()
    if data.lstrip().startswith(b"-----BEGIN"):
        key = serialization.load_pem_public_key(data)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"{path}: a {type(key).__name__}, not an Ed25519 public key")
        return key
    return Ed25519PublicKey.from_public_bytes(_raw(data, path, "public key"))


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    """The audit private key in `path`; refused if group or others may read the file."""
    path = Path(path)
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"{path}: group or others may read the audit private key (chmod 600)")
    data = path.read_bytes()
    if data.lstrip().startswith(b"-----BEGIN"):
        key = serialization.load_pem_private_key(data, password=None)
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
