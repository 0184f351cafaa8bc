"""Key file, keyring, key versions and DEK wrapping (pacsd.keys)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from pacsd.keys import FileKEK, KeyProblem, Keyring, create_keyring, read_key_file


def key_file(tmp_path: Path, name: str = "storage.key", mode: int = 0o600,
             data: bytes | None = None) -> Path:
    p = tmp_path / name
    p.write_bytes(os.urandom(32) if data is None else data)
    p.chmod(mode)
    return p


def test_key_file_checks(tmp_path: Path) -> None:
    assert len(read_key_file(key_file(tmp_path))) == 32
    with pytest.raises(KeyProblem, match="not found"):
        read_key_file(tmp_path / "nope")
    with pytest.raises(KeyProblem, match="0600"):
        read_key_file(key_file(tmp_path, "open.key", 0o640))
    with pytest.raises(KeyProblem, match="32 bytes"):
        read_key_file(key_file(tmp_path, "short.key", data=b"x" * 31))


def test_keyring_created_0600_with_wrapped_keys_only(tmp_path: Path) -> None:
    kek = FileKEK.from_file(key_file(tmp_path))
    ring_path = tmp_path / "data" / "keyring.json"
    assert create_keyring(ring_path, kek) is True
    assert create_keyring(ring_path, kek) is False  # never overwritten
    assert stat.S_IMODE(ring_path.stat().st_mode) == 0o600
    ring = Keyring(ring_path, kek)
    version, dek = ring.current()
    assert version == 1 and len(dek) == 32
    doc = json.loads(ring_path.read_text())
    assert doc["kek"] == {"provider": "file", "id": kek.kek_id}
    assert dek.hex() not in ring_path.read_text()
    assert doc["versions"][0]["version"] == 1


def test_rotate_adds_current_version_and_keeps_old(tmp_path: Path) -> None:
    kek = FileKEK.from_file(key_file(tmp_path))
    ring_path = tmp_path / "keyring.json"
    create_keyring(ring_path, kek)
    ring = Keyring(ring_path, kek)
    old = ring.dek(1)
    assert ring.rotate() == 2
    assert ring.current()[0] == 2 and ring.dek(1) == old and ring.dek(2) != old
    other = Keyring(ring_path, kek)  # another process sees the rotation
    assert other.current_version == 2
    assert ring.retire({2}) == [1]
    with pytest.raises(KeyProblem, match="version 1"):
        ring.dek(1)
    with pytest.raises(KeyProblem, match="version 9"):
        ring.dek(9)


def test_a_running_keyring_notices_rotation_by_another(tmp_path: Path) -> None:
    kek = FileKEK.from_file(key_file(tmp_path))
    ring_path = tmp_path / "keyring.json"
    create_keyring(ring_path, kek)
    serving = Keyring(ring_path, kek)
    Keyring(ring_path, kek).rotate()
    serving.refresh(force=True)
    assert serving.current_version == 2


def test_wrong_key_or_altered_keyring_refused(tmp_path: Path) -> None:
    kek = FileKEK.from_file(key_file(tmp_path))
    ring_path = tmp_path / "keyring.json"
    create_keyring(ring_path, kek)
    wrong = FileKEK.from_file(key_file(tmp_path, "other.key"))
    with pytest.raises(KeyProblem, match="not the key that wraps"):
        Keyring(ring_path, wrong)
    doc = json.loads(ring_path.read_text())
    doc["versions"][0]["version"] = 2  # a wrapped key moved to another version number
    doc["current"] = 2
    ring_path.write_text(json.dumps(doc))
    with pytest.raises(KeyProblem, match="does not open"):
        Keyring(ring_path, kek)
    ring_path.write_text("{not json")
    with pytest.raises(KeyProblem, match="unreadable"):
        Keyring(ring_path, kek)


def test_wrap_is_bound_to_aad(tmp_path: Path) -> None:
    kek = FileKEK(os.urandom(32))
    blob = kek.wrap(b"k" * 32, b"a")
    assert kek.unwrap(blob, b"a") == b"k" * 32
    with pytest.raises(KeyProblem):
        kek.unwrap(blob, b"b")
    with pytest.raises(KeyProblem):
        FileKEK(os.urandom(32)).unwrap(blob, b"a")


def test_totp_secrets_use_key_versions(tmp_path: Path) -> None:
    from pacsd.auth.secrets import KeyringBox, SecretBox, SecretError

    key = key_file(tmp_path)
    kek = FileKEK.from_file(key)
    create_keyring(tmp_path / "keyring.json", kek)
    ring = Keyring(tmp_path / "keyring.json", kek)
    legacy = SecretBox.from_file(key)
    box = KeyringBox(ring, legacy)
    blob = box.seal(b"JBSWY3DPEHPK3PXP", aad=b"alice")
    assert blob[:2] == b"P2" and box.version_of(blob) == 1
    ring.rotate()
    assert box.version_of(box.seal(b"x", aad=b"a")) == 2
    assert box.unseal(blob, aad=b"alice") == b"JBSWY3DPEHPK3PXP"  # old version still opens
    assert box.unseal(legacy.seal(b"old", aad=b"bob"), aad=b"bob") == b"old"  # P1 blobs too
    with pytest.raises(SecretError):
        box.unseal(blob, aad=b"bob")
    ring.retire({2})
    with pytest.raises(SecretError, match="version 1"):
        box.unseal(blob, aad=b"alice")
