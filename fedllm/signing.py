"""Node keys: each client signs the ledger rows it reports, so the coordinator cannot alter them unseen.

Keys are EC P-384 in OpenSSH format, the format Flower's SuperNode authentication takes, so one key file
can serve both purposes. All cryptography is the ``cryptography`` package's; nothing here is hand-made.
The private key is written with mode 0600 from the first byte (it is never world-readable, not even
between create and chmod), and no function here logs or returns key material except the public key.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedllm.errors import FedllmError
from fedllm.files import PRIVATE_MODE, PUBLIC_MODE, atomic_write_bytes, create_new

log = logging.getLogger("fedllm.signing")

CURVE = ec.SECP384R1()
HASH = hashes.SHA384()


def public_path(path: Path) -> Path:
    """``node_key`` -> ``node_key.pub`` (appended, not a replaced suffix: ``a.key`` -> ``a.key.pub``)."""
    return path.with_name(path.name + ".pub")


def _write_public(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pub = public_path(path)
    text = public_openssh(key) + "\n"
    try:
        if pub.read_text() == text:
            return
    except FileNotFoundError:
        pass
    write_public(pub, text)


def _load(path: Path) -> ec.EllipticCurvePrivateKey:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("%s: private key was readable by others (mode %o); restricting it to 0600", path, mode)
        os.chmod(path, PRIVATE_MODE)
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, UnsupportedAlgorithm) as exc:
        # The message names the file only: the parser's error could quote key bytes.
        raise FedllmError(f"{path}: not an unencrypted OpenSSH private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != CURVE.name:
        raise FedllmError(f"{path}: node key must be ECDSA P-384 ({CURVE.name})")
    return key


def load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """This node's signing key, created on first use; also (re)writes ``<path>.pub`` from it.

    Creation is atomic and never replaces an existing key: the key is written to a temporary file made
    with mode 0600 and then hard-linked into place, which fails if another process got there first (that
    key is then loaded instead). A node must keep one identity, or its earlier signatures stop verifying.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        key = ec.generate_private_key(CURVE)
        if create_new(path, private_openssh(key), mode=PRIVATE_MODE):  # else created concurrently: that one
            log.info("created node key %s (public key fingerprint %s)", path, fingerprint(public_openssh(key)))
    key = _load(path)
    _write_public(path, key)
    return key


def private_openssh(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The unencrypted OpenSSH private key file's bytes: for writing with :func:`write_private` only."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )


def write_private(path: Path, data: bytes, *, overwrite: bool = False) -> None:
    """Put a private key at ``path``, mode 0600 from its first byte, fsync'd, and complete or absent.

    Without ``overwrite`` an existing file is never replaced (``FileExistsError``, raised atomically by
    ``link``): losing a key that others have registered or trust is worse than a failed command.
    """
    if overwrite:
        atomic_write_bytes(path, data, mode=PRIVATE_MODE)
    elif not create_new(path, data, mode=PRIVATE_MODE):
        raise FileExistsError(path)


def write_public(path: Path, text: str) -> None:
    """A public file (certificate, ``.pub`` key), mode 0644, replaced atomically."""
    atomic_write_bytes(path, text.encode(), mode=PUBLIC_MODE)


def public_openssh(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> str:
    """``ecdsa-sha2-nistp384 AAAA...``: the form stored in the ledger's ``signer`` column and ``.pub`` files."""
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def sign(key: ec.EllipticCurvePrivateKey, payload: bytes) -> str:
    """ECDSA/SHA-384 over ``payload``, DER-encoded, as hex (what the ledger's ``signature`` column holds)."""
    return key.sign(payload, ec.ECDSA(HASH)).hex()


def verify(public_openssh: str, payload: bytes, signature_hex: str) -> bool:
    """True only for a valid signature by exactly this key; any malformed input is simply False."""
    try:
        public = serialization.load_ssh_public_key(public_openssh.strip().encode())
        if not isinstance(public, ec.EllipticCurvePublicKey):
            return False
        public.verify(bytes.fromhex(signature_hex), payload, ec.ECDSA(HASH))
    except (InvalidSignature, ValueError, UnsupportedAlgorithm, TypeError):
        return False
    return True


def fingerprint(public_openssh: str) -> str:
    """``SHA256:`` plus the first 16 characters of ssh-keygen's fingerprint: enough to tell keys apart."""
    parts = public_openssh.strip().split()
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (IndexError, ValueError):
        blob = public_openssh.strip().encode()
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest[:16]}"


def same_key(a: str, b: str) -> bool:
    """Two OpenSSH public key lines name the same key (the comment field, if any, is ignored)."""
    return a.strip().split()[:2] == b.strip().split()[:2]
