"""Node keys: private from the first byte, stable across loads, and signatures that bind key and payload."""

from __future__ import annotations

import logging
import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedllm.errors import FedllmError
from fedllm.signing import fingerprint, load_or_create_key, public_openssh, public_path, same_key, sign, verify


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_key_file_is_0600_and_public_key_beside_it(tmp_path):
    path = tmp_path / "state" / "nested" / "node_key"
    old = os.umask(0o000)  # even with a permissive umask the private key is never group/world readable
    try:
        key = load_or_create_key(path)
    finally:
        os.umask(old)
    assert _mode(path) == 0o600
    assert public_path(path) == tmp_path / "state" / "nested" / "node_key.pub"
    pub = public_path(path).read_text().strip()
    assert pub == public_openssh(key) and pub.startswith("ecdsa-sha2-nistp384 ")
    assert sorted(p.name for p in path.parent.iterdir()) == ["node_key", "node_key.pub"]  # no temp files left
    text = path.read_text()
    assert text.startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    loaded = serialization.load_ssh_private_key(text.encode(), password=None)  # unencrypted OpenSSH, P-384
    assert isinstance(loaded, ec.EllipticCurvePrivateKey) and loaded.curve.name == "secp384r1"


def test_key_is_stable_and_never_replaced(tmp_path):
    path = tmp_path / "node_key"
    first = public_openssh(load_or_create_key(path))
    before = path.read_bytes()
    assert public_openssh(load_or_create_key(path)) == first
    assert path.read_bytes() == before
    public_path(path).write_text("ecdsa-sha2-nistp384 AAAAforged\n")  # a replaced .pub is restored from the key
    load_or_create_key(path)
    assert public_path(path).read_text().strip() == first


def test_loose_permissions_are_tightened(tmp_path):
    path = tmp_path / "node_key"
    load_or_create_key(path)
    os.chmod(path, 0o644)
    load_or_create_key(path)
    assert _mode(path) == 0o600


def test_not_a_key_is_a_clear_error(tmp_path):
    path = tmp_path / "node_key"
    path.write_text("not a key")
    os.chmod(path, 0o600)
    with pytest.raises(FedllmError, match="not an unencrypted OpenSSH private key"):
        load_or_create_key(path)


def test_sign_verify_round_trip(tmp_path):
    key = load_or_create_key(tmp_path / "node_key")
    pub = public_openssh(key)
    payload = b'{"epsilon":1.5,"round":3}'
    signature = sign(key, payload)
    assert bytes.fromhex(signature)  # hex text, as stored in the ledger
    assert verify(pub, payload, signature)
    assert verify(pub + " comment", payload, signature)  # an OpenSSH comment does not matter
    assert not verify(pub, payload.replace(b"1.5", b"0.5"), signature)
    assert sign(key, payload) != signature  # ECDSA is randomised; both verify
    assert verify(pub, payload, sign(key, payload))


def test_wrong_key_and_garbage_fail(tmp_path):
    key = load_or_create_key(tmp_path / "a")
    other = load_or_create_key(tmp_path / "b")
    payload = b"row"
    signature = sign(key, payload)
    assert not verify(public_openssh(other), payload, signature)
    assert not verify(public_openssh(key), payload, sign(other, payload))
    assert not verify(public_openssh(key), payload, "zz-not-hex")
    assert not verify(public_openssh(key), payload, "")
    assert not verify("ssh-ed25519 AAAAgarbage", payload, signature)
    assert not verify("", payload, signature)


def test_fingerprint_is_short_stable_and_distinguishes_keys(tmp_path):
    a = public_openssh(load_or_create_key(tmp_path / "a"))
    b = public_openssh(load_or_create_key(tmp_path / "b"))
    assert fingerprint(a) == fingerprint(a + " comment") and fingerprint(a).startswith("SHA256:")
    assert len(fingerprint(a)) == len("SHA256:") + 16
    assert fingerprint(a) != fingerprint(b)
    assert same_key(a, a + " comment") and not same_key(a, b)


def _secret_lines(key_path) -> list[str]:
    """The base64 body of the private key file: none of it may leak anywhere."""
    return [line for line in key_path.read_text().splitlines() if line and not line.startswith("-----")]


def test_key_material_never_logged_or_reported(tmp_path, caplog, capsys):
    """Create keys, sign, audit and report a run with DEBUG logging on: no private key bytes come out."""
    from test_audit import write_run

    from fedllm.audit.verify import audit
    from fedllm.cli.audit import print_audit
    from fedllm.report.write import write_reports

    caplog.set_level(logging.DEBUG)
    run = write_run(tmp_path / "run", rounds=1)
    key_paths = sorted((run / "clients").glob("*/node_key"))
    assert len(key_paths) == 3
    print_audit(audit(run))
    paths = write_reports(run)
    secrets = [line for p in key_paths for line in _secret_lines(p)]
    scalars = [
        format(serialization.load_ssh_private_key(p.read_bytes(), None).private_numbers().private_value, "x")
        for p in key_paths
    ]
    assert secrets and scalars
    captured = capsys.readouterr()
    texts = [caplog.text, captured.out, captured.err, *(p.read_text() for p in paths.values())]
    for text in texts:
        for secret in [*secrets, *scalars]:
            assert secret not in text
    assert "created node key" in caplog.text  # the log does say a key was made (by fingerprint only)
