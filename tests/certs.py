"""Throwaway certificates for TLS tests: a private CA and a server certificate it signs.

Made with `cryptography.x509` on the fly, never checked in: a key in the
repository would be a key anyone could use. The server certificate names
127.0.0.1 (an IP SAN, which is what a client checks for an IP address) and
localhost, for an hour or so, with the extensions strict verifiers ask for
(Python 3.13's VERIFY_X509_STRICT wants key identifiers on both sides).

    files = server_files(tmp_path / "tls")       # ca.pem, server.pem, server.key
    other = authority("another CA").write(tmp_path / "other")   # a CA that signed nothing
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Authority", "TlsFiles", "authority", "server_files"]

#: Certificates are valid from a little before now (clocks differ) to a little after.
VALID_BEFORE = datetime.timedelta(minutes=5)
VALID_FOR = datetime.timedelta(hours=2)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files of a server: its CA's certificate, its certificate and its key (0600)."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class Authority:
    """A CA of one test: its key and self-signed certificate."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def issue(
        self, common_name: str, *, ips: tuple[str, ...] = (), dns: tuple[str, ...] = ()
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """A server key and certificate for `ips` and `dns` names, signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - VALID_BEFORE)
            .not_valid_after(now + VALID_FOR)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
            .sign(self.key, hashes.SHA256())
        )
        return key, cert

    def write(self, folder: Path, name: str = "ca.pem") -> Path:
        """Write the CA certificate (public) as PEM; the CA key is never written."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return path


def authority(common_name: str = "Bulwark test CA") -> Authority:
    """A fresh self-signed CA that may sign server certificates (and no other CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - VALID_BEFORE)
        .not_valid_after(now + VALID_FOR)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return Authority(key, cert)


def server_files(
    folder: Path,
    *,
    ips: tuple[str, ...] = ("127.0.0.1",),
    dns: tuple[str, ...] = ("localhost",),
    ca: Authority | None = None,
) -> TlsFiles:
    """A CA and a server certificate it signed for `ips` and `dns`, as PEM files in `folder`."""
    ca = ca or authority()
    key, cert = ca.issue("bulwark-test-redis", ips=ips, dns=dns)
    ca_path = ca.write(folder)
    cert_path = folder / "server.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = folder / "server.key"
    _write_secret(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return TlsFiles(ca=ca_path, cert=cert_path, key=key_path)


def _write_secret(path: Path, data: bytes) -> None:
    """Create `path` at mode 0600 from the start (never briefly readable by others)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(data)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Bulwark tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )
