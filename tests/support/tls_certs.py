"""A small PKI for TLS tests, made with `cryptography`: two CAs, server and client certificates."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Identity:
    """A certificate and its key as PEM files."""

    certificate: Path
    private_key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA that signs the router's, the PACS's and the workstation's certificates
    other_ca: Path  # an unrelated CA
    server: Identity  # CN dicomrouter, for 127.0.0.1 and localhost
    client: Identity  # CN WORKSTATION
    other_client: Identity  # signed by other_ca
    expired_client: Identity
    expired_server: Identity


def _key() -> rsa.RSAPrivateKey:
    # RSA: every TLS profile of DCMTK's echoscu accepts it.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dicomrouter tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(folder: Path, stem: str, certificate: x509.Certificate, key: rsa.RSAPrivateKey) -> Identity:
    cert_path = folder / f"{stem}.crt"
    key_path = folder / f"{stem}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return Identity(cert_path, key_path)


def _ca(folder: Path, stem: str, common_name: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey, Path]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return certificate, key, _write(folder, stem, certificate, key).certificate


def _leaf(
    folder: Path,
    stem: str,
    common_name: str,
    issuer: tuple[x509.Certificate, rsa.RSAPrivateKey],
    expired: bool = False,
) -> Identity:
    ca_certificate, ca_key = issuer
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    if expired:
        not_before, not_after = now - datetime.timedelta(days=20), now - datetime.timedelta(days=10)
    else:
        not_before, not_after = now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return _write(folder, stem, certificate, key)


def make_pki(folder: Path) -> Pki:
    """Write every certificate and key of the tests into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key, ca_path = _ca(folder, "ca", "dicomrouter test CA")
    other_cert, other_key, other_path = _ca(folder, "other-ca", "another CA")
    return Pki(
        ca=ca_path,
        other_ca=other_path,
        server=_leaf(folder, "server", "dicomrouter", (ca_cert, ca_key)),
        client=_leaf(folder, "client", "WORKSTATION", (ca_cert, ca_key)),
        other_client=_leaf(folder, "other-client", "WORKSTATION", (other_cert, other_key)),
        expired_client=_leaf(folder, "expired-client", "WORKSTATION", (ca_cert, ca_key), expired=True),
        expired_server=_leaf(folder, "expired-server", "dicomrouter", (ca_cert, ca_key), expired=True),
    )
