"""Sealed TOTP secrets (pacsd.auth.secrets): AES-256-GCM under the storage key file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pacsd.auth.secrets import SecretBox, SecretError
from pacsd.errors import EnvironmentProblem


def key_file(tmp_path: Path, data: bytes | None = None, mode: int = 0o600) -> Path:
    p = tmp_path / "storage.key"
    p.write_bytes(os.urandom(32) if data is None else data)
    p.chmod(mode)
    return p


def test_seal_and_unseal(tmp_path: Path) -> None:
    box = SecretBox.from_file(key_file(tmp_path))
    blob = box.seal(b"JBSWY3DPEHPK3PXP", aad=b"alice")
    assert b"JBSWY3DPEHPK3PXP" not in blob
    assert box.unseal(blob, aad=b"alice") == b"JBSWY3DPEHPK3PXP"
    assert box.seal(b"x", aad=b"a") != box.seal(b"x", aad=b"a")  # fresh nonce each time


def test_wrong_owner_altered_or_other_key_refused(tmp_path: Path) -> None:
    box = SecretBox.from_file(key_file(tmp_path))
    blob = box.seal(b"secret", aad=b"alice")
    with pytest.raises(SecretError):
        box.unseal(blob, aad=b"bob")
    with pytest.raises(SecretError):
        box.unseal(blob[:-1] + bytes([blob[-1] ^ 1]), aad=b"alice")
    with pytest.raises(SecretError):
        SecretBox(os.urandom(32)).unseal(blob, aad=b"alice")
    with pytest.raises(SecretError):
        box.unseal(b"junk", aad=b"alice")


def test_missing_short_or_open_key_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EnvironmentProblem, match="not found"):
        SecretBox.from_file(tmp_path / "nope.key")
    with pytest.raises(EnvironmentProblem, match="32 bytes"):
        SecretBox.from_file(key_file(tmp_path, b"short"))
    with pytest.raises(EnvironmentProblem, match="0600"):
        SecretBox.from_file(key_file(tmp_path, mode=0o644))
