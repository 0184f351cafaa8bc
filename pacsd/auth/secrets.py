"""Secrets at rest (TOTP seeds): AES-256-GCM under the key at `[storage] key_file`.

A small API on purpose, so a later key-rotation change can swap what is behind it:
`box_for(cfg)` gives a SecretBox; `seal` and `unseal` take associated data that binds
the ciphertext to its owner (a sealed secret copied to another user's row does not open).

Sealed format: b"P1" | key id (4 bytes: SHA-256 of a domain string and the key, so a
rotated key can tell which key sealed a blob) | nonce (12 random bytes) | ciphertext+tag.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pacsd.config import Config
from pacsd.errors import EnvironmentProblem

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


def box_for(cfg: Config) -> SecretBox:
    """The SecretBox of this node's storage key; raises EnvironmentProblem (see from_file)."""
    return SecretBox.from_file(cfg.storage.key_file)
