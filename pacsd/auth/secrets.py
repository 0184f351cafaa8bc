"""Secrets at rest (TOTP seeds): AES-256-GCM under the key at `[storage] key_file`.

A small API on purpose, so a later key-rotation change can swap what is behind it:
`box_for(cfg)` gives a SecretBox; `seal` and `unseal` take associated data that binds
the ciphertext to its owner (a sealed secret copied to another user's row does not open).

Sealed format: b"P1" | key id (4 bytes: SHA-256 of a domain string and the key, so a
rotated key can tell which key sealed a blob) | nonce (12 random bytes) | ciphertext+tag.

Since issue 7 the secrets are on the same key machinery as the object store
(`pacsd.keys`): `box_for(cfg)` seals with the data key of the keyring's current version,
b"P2" | key version (4 bytes, big-endian) | nonce (12) | ciphertext+tag, and still opens
P1 blobs sealed directly under the key file; `pacsd key rewrap` re-seals old ones.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import threading
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pacsd.config import Config
from pacsd.errors import EnvironmentProblem
from pacsd.keys import KeyProblem, Keyring, read_key_file

KEY_BYTES = 32
_MAGIC = b"P1"
_NONCE = 12


class SecretError(EnvironmentProblem):
    """A sealed secret does not open: wrong key, altered data or another owner's blob."""


class SecretBox:
    """Seal and unseal small secrets with one 256-bit key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise EnvironmentProblem(f"secret key must be {KEY_BYTES} bytes, got {len(key)}")
        self._aead = AESGCM(key)
        self.key_id = hashlib.sha256(b"pacsd key id\0" + key).digest()[:4]

    @classmethod
    def from_file(cls, path: str | Path) -> SecretBox:
        """Read the key file; raises EnvironmentProblem when missing, too open or malformed."""
        p = Path(path)
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise EnvironmentProblem(
                f"{p}: storage key file not found ([storage] key_file; `pacsd init` creates it)"
            ) from None
        except OSError as exc:
            raise EnvironmentProblem(f"{p}: cannot read storage key: {exc.strerror}") from None
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise EnvironmentProblem(f"{p}: storage key is not a regular file")
            if mode & 0o077:
                raise EnvironmentProblem(
                    f"{p}: storage key has mode {stat.S_IMODE(mode):04o}; it must be 0600"
                )
            key = os.read(fd, KEY_BYTES + 1)
        finally:
            os.close(fd)
        if len(key) != KEY_BYTES:
            raise EnvironmentProblem(f"{p}: storage key must be exactly {KEY_BYTES} bytes")
        return cls(key)

    def seal(self, plaintext: bytes, *, aad: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return _MAGIC + self.key_id + nonce + self._aead.encrypt(nonce, plaintext, aad)

    def unseal(self, blob: bytes, *, aad: bytes) -> bytes:
        """Raises SecretError when the blob is malformed, from another key, or altered."""
        head = len(_MAGIC) + len(self.key_id)
        if len(blob) < head + _NONCE + 16 or blob[: len(_MAGIC)] != _MAGIC:
            raise SecretError("sealed secret is malformed")
        if blob[len(_MAGIC):head] != self.key_id:
            raise SecretError("sealed secret was made with another storage key")
        nonce = blob[head:head + _NONCE]
        try:
            return self._aead.decrypt(nonce, blob[head + _NONCE:], aad)
        except InvalidTag:
            raise SecretError("sealed secret does not authenticate (altered?)") from None


_MAGIC_V2 = b"P2"
_V2_AAD = b"pacsd secret\0"  # domain separation: the same data keys wrap object keys


class KeyringBox:
    """Seals under the keyring's current key version (P2); opens P2 of any version still
    in the keyring and legacy P1 blobs sealed under the key file itself."""

    def __init__(self, keyring: Keyring, legacy: SecretBox) -> None:
        self.keyring = keyring
        self.legacy = legacy

    def seal(self, plaintext: bytes, *, aad: bytes) -> bytes:
        version, dek = self.keyring.current()
        nonce = os.urandom(_NONCE)
        head = _MAGIC_V2 + struct.pack(">I", version)
        return head + nonce + AESGCM(dek).encrypt(nonce, plaintext, _V2_AAD + aad)

    def version_of(self, blob: bytes) -> int | None:
        """The key version a P2 blob was sealed with; None for a legacy P1 blob."""
        if blob[:2] == _MAGIC_V2 and len(blob) >= 6:
            return int(struct.unpack(">I", blob[2:6])[0])
        return None

    def unseal(self, blob: bytes, *, aad: bytes) -> bytes:
        """Raises SecretError when the blob is malformed, from another key, or altered."""
        if blob[:2] != _MAGIC_V2:
            return self.legacy.unseal(blob, aad=aad)
        if len(blob) < 6 + _NONCE + 16:
            raise SecretError("sealed secret is malformed")
        version = self.version_of(blob)
        assert version is not None
        try:
            dek = self.keyring.dek(version)
        except KeyProblem:
            raise SecretError(f"sealed secret uses key version {version}, which is not in "
                              "the keyring") from None
        try:
            return AESGCM(dek).decrypt(blob[6:6 + _NONCE], blob[6 + _NONCE:], _V2_AAD + aad)
        except InvalidTag:
            raise SecretError("sealed secret does not authenticate (altered?)") from None


_boxes: dict[tuple[str, str], tuple[tuple[int, int, int], KeyringBox]] = {}
_boxes_lock = threading.Lock()


def box_for(cfg: Config) -> KeyringBox:
    """The secret box of this node's keys (the keyring is created when missing).

    Raises EnvironmentProblem: key file missing, too open or malformed; keyring not
    opened by this key file.
    """
    key_path = Path(cfg.storage.key_file)
    try:
        st = key_path.stat()
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = (0, 0, 0)
    cache_key = (str(key_path), cfg.storage.keyring)
    with _boxes_lock:
        hit = _boxes.get(cache_key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        box = KeyringBox(Keyring.open(cfg, create=True), SecretBox(read_key_file(key_path)))
        _boxes[cache_key] = (stamp, box)
        return box
