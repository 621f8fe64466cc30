"""A consortium's credentials: a CA, the SuperLink's TLS certificate, and one node key per institution.

``fedllm certs DIR --san HOST ... --node NAME ...`` writes::

    DIR/ca.crt, DIR/ca.key              the consortium CA (EC P-384, self-signed); ca.crt goes to every node
    DIR/server.crt, DIR/server.key      the SuperLink's certificate, signed by the CA, for the given SANs
    DIR/nodes/NAME/node_key(.pub)       an institution's EC P-384 key pair in OpenSSH format

A node key is the institution's identity twice over: the SuperLink admits only registered public keys
(Flower's SuperNode authentication), and the same key signs the ledger rows the institution reports, so the
key the consortium registered is the key an auditor trusts. Private keys are created mode 0600 through
:mod:`fedllm.signing` and are never printed or logged; existing keys are never replaced without ``--force``.
Everything cryptographic is the ``cryptography`` package's.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedllm.errors import ConfigError, FedllmError
from fedllm.signing import (
    CURVE,
    HASH,
    fingerprint,
    private_openssh,
    public_openssh,
    public_path,
    write_private,
    write_public,
)

ORGANIZATION = "fedllm consortium"
DEFAULT_DAYS = 825
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DNS_NAME = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?$")


@dataclass(frozen=True)
class ConsortiumPaths:
    """Where each credential lives under the consortium directory; the commands read the same names."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    def node_key(self, name: str) -> Path:
        return self.root / "nodes" / name / "node_key"


# ------------------------------------------------------------------------------------------------ parsing


def parse_san(text: str) -> x509.GeneralName:
    """An IP address (v4 or v6) or a DNS name; anything else is refused naming the flag."""
    value = text.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not value or len(value) > 253 or not _DNS_NAME.match(value):
        raise ConfigError(f"--san: {text!r} is neither an IP address nor a DNS name")
    return x509.DNSName(value.lower())


def check_node_name(name: str) -> str:
    """A node name becomes a directory name: letters, digits, '.', '_' and '-' only, no path tricks."""
    if not _NODE_NAME.match(name) or name in (".", ".."):
        raise ConfigError(
            f"--node: {name!r} is not a valid node name (letters, digits, '.', '_', '-'; at most 64 characters)"
        )
    return name


# ------------------------------------------------------------------------------------------------ making


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_cert(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may sign end-entity certificates only (path length 0)."""
    key = ec.generate_private_key(CURVE)
    name = _name(f"{ORGANIZATION} CA")
    start = _now() - dt.timedelta(minutes=5)  # tolerate small clock differences between hosts
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, HASH)
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, sans: list[x509.GeneralName], days: int
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's TLS certificate: TLS clients check the host they dial against ``sans``."""
    key = ec.generate_private_key(CURVE)
    start = _now() - dt.timedelta(minutes=5)
    first = sans[0].value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(str(first)))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(min(start + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, HASH)
    )
    return key, cert


def _refuse_existing(paths: list[Path], force: bool) -> None:
    """Check everything first, so a refused command writes nothing at all."""
    if force:
        return
    for path in paths:
        if path.exists():
            raise FedllmError(f"{path}: already exists; refusing to overwrite a key (use --force to replace it)")


def _write_key(path: Path, data: bytes, force: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_private(path, data, overwrite=force)
    except FileExistsError:
        raise FedllmError(f"{path}: already exists; refusing to overwrite a key (use --force to replace it)") from None


def make_consortium(
    root: Path, sans: list[str], nodes: list[str], *, days: int = DEFAULT_DAYS, force: bool = False
) -> list[str]:
    """Write the requested credentials; returns one line per file written (paths and fingerprints only).

    With ``sans`` a new CA and server certificate are made; with ``nodes`` one key pair per node. Adding
    a member later is ``--node NEW`` alone: the CA is left as it is.
    """
    if not sans and not nodes:
        raise ConfigError("nothing to make: give --san (CA and server certificate) and/or --node (node keys)")
    names = [parse_san(s) for s in sans]
    node_names = [check_node_name(n) for n in nodes]
    doubled = sorted({n for n in node_names if node_names.count(n) > 1})
    if doubled:
        raise ConfigError(f"--node: {', '.join(doubled)} given more than once")
    if days < 1:
        raise ConfigError(f"--days: must be >= 1, got {days}")
    paths = ConsortiumPaths(root)
    secrets = ([paths.ca_key, paths.server_key] if names else []) + [paths.node_key(n) for n in node_names]
    _refuse_existing(secrets, force)
    if root.exists() and not root.is_dir():
        raise FedllmError(f"{root}: exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    done: list[str] = []
    if names:
        ca_key, ca_cert = make_ca(days)
        _write_key(paths.ca_key, _pem_key(ca_key), force)
        write_public(paths.ca_cert, _pem_cert(ca_cert))
        server_key, server_cert = make_server_cert(ca_key, ca_cert, names, days)
        _write_key(paths.server_key, _pem_key(server_key), force)
        write_public(paths.server_cert, _pem_cert(server_cert))
        listed = ", ".join(str(n.value) for n in names)
        done += [
            f"CA certificate      {paths.ca_cert}  (key {paths.ca_key}: keep it offline)",
            f"server certificate  {paths.server_cert}  for {listed}  (key {paths.server_key})",
        ]
    for name in node_names:
        key = ec.generate_private_key(CURVE)
        path = paths.node_key(name)
        _write_key(path, private_openssh(key), force)
        write_public(public_path(path), public_openssh(key) + "\n")
        done.append(
            f"node key {name:<12} {path}  (public {public_path(path).name}, {fingerprint(public_openssh(key))})"
        )
    return done
