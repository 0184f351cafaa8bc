"""Keys at rest: a key-encryption key (KEK) wraps one data key (DEK) per key version.

The KEK is 32 random bytes in `[storage] key_file` (0600, outside the object root;
`pacsd init` writes it). It never encrypts data itself: it only wraps the data keys,
which live in the keyring file `[storage] keyring` (JSON, 0600, in the data directory
so that backups carry it; without the KEK it is useless).

Keyring format (version 1):

    {"format": 1,
     "kek": {"provider": "file", "id": "<16 hex: SHA-256 of a domain string and the KEK>"},
     "current": 2,
     "versions": [{"version": 1, "created": "<RFC 3339>", "wrapped": "<base64>"}, ...]}

A wrapped DEK is nonce (12) | AES-256-GCM(KEK, DEK) with associated data
b"pacsd dek\\0" + version (4 bytes, big-endian), so a wrapped key moved to another
version number does not open. The `kek` object names the provider: a later KMS or HSM
provider (e.g. {"provider": "kms", "uri": "..."}) implements the same two calls,
`wrap(dek, aad)` and `unwrap(blob, aad)`, and the keyring, the object envelopes and the
sealed TOTP secrets stay as they are (switching provider = unwrap with the old, wrap
with the new, one small file rewritten).

Object envelopes (`pacsd.store.envelope`) record the key version that wraps their
per-object key; `rotate` adds a version that new objects use; `pacsd key rewrap`
re-encrypts old objects so an old version can be retired.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import stat
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pacsd.config import Config
from pacsd.errors import EnvironmentProblem
from pacsd.fsutil import fsync_dir

KEY_BYTES = 32
RING_FORMAT = 1
_NONCE = 12
_RECHECK_SECONDS = 1.0  # how often a running process looks for a rotated keyring


class KeyProblem(EnvironmentProblem):
    """The key file or keyring is missing, malformed, or not the pair that belongs together."""


class KeyEncryptionKey(Protocol):
    """What a KEK provider does: the file provider below; a KMS/HSM one later."""

    provider: str
    kek_id: str  # non-secret identifier, recorded in the keyring

    def wrap(self, dek: bytes, aad: bytes) -> bytes: ...

    def unwrap(self, blob: bytes, aad: bytes) -> bytes: ...


def read_key_file(path: str | Path) -> bytes:
    """The 32 bytes of a 0600 key file; raises KeyProblem (missing, too open, malformed)."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise KeyProblem(f"{p}: storage key file not found ([storage] key_file; "
                        "`pacsd init` creates it)") from None
    except OSError as exc:
        raise KeyProblem(f"{p}: cannot read storage key: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise KeyProblem(f"{p}: storage key is not a regular file")
        if mode & 0o077:
            raise KeyProblem(f"{p}: storage key has mode {stat.S_IMODE(mode):04o}; "
                            "it must be 0600")
        key = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(key) != KEY_BYTES:
        raise KeyProblem(f"{p}: storage key must be exactly {KEY_BYTES} bytes")
    return key


class FileKEK:
    """The KEK read from `[storage] key_file`."""

    provider = "file"

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise KeyProblem(f"key-encryption key must be {KEY_BYTES} bytes")
        self._aead = AESGCM(key)
        self.kek_id = hashlib.sha256(b"pacsd kek id\0" + key).hexdigest()[:16]

    @classmethod
    def from_file(cls, path: str | Path) -> FileKEK:
        return cls(read_key_file(path))

    def wrap(self, dek: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, dek, aad)

    def unwrap(self, blob: bytes, aad: bytes) -> bytes:
        """Raises KeyProblem when the blob does not open under this KEK."""
        try:
            return self._aead.decrypt(blob[:_NONCE], blob[_NONCE:], aad)
        except (InvalidTag, ValueError):
            raise KeyProblem("a wrapped data key does not open with the storage key") from None


def _dek_aad(version: int) -> bytes:
    return b"pacsd dek\0" + struct.pack(">I", version)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class KeyVersion:
    version: int
    created: str
    wrapped: bytes


class Keyring:
    """The data keys of one node, by version; thread-safe, shared by a whole process.

    A running process notices a rotation made by another process (`pacsd key rotate`)
    within a second: `current()` re-reads the file when its identity changed.
    """

    def __init__(self, path: str | Path, kek: KeyEncryptionKey) -> None:
        self.path = Path(path)
        self.kek = kek
        self._lock = threading.Lock()
        self._versions: dict[int, KeyVersion] = {}
        self._current = 0
        self._deks: dict[int, bytes] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._load()

    # -- opening --------------------------------------------------------------------
    @classmethod
    def open(cls, cfg: Config, *, create: bool = False) -> Keyring:
        """The node's keyring; with `create`, version 1 is made when there is none.

        Raises KeyProblem (key file missing/too open/malformed, keyring missing, or the key
        file is not the one that wraps the keyring).
        """
        kek = FileKEK.from_file(cfg.storage.key_file)
        path = Path(cfg.storage.keyring)
        if not path.exists():
            if not create:
                raise KeyProblem(f"{path}: keyring not found ([storage] keyring; "
                                "it is created with the first encrypted object)")
            create_keyring(path, kek)
        return cls(path, kek)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _load(self) -> None:
        stamp = self._stat()
        data = _read_ring(self.path)
        kek_info = data.get("kek", {})
        if kek_info.get("provider") != self.kek.provider:
            raise KeyProblem(f"{self.path}: keyring needs KEK provider "
                            f"{kek_info.get('provider')!r}, this node has {self.kek.provider!r}")
        if kek_info.get("id") != self.kek.kek_id:
            raise KeyProblem(f"{self.path}: the storage key file is not the key that wraps "
                            "this keyring (wrong [storage] key_file?)")
        versions = {v.version: v for v in _parse_versions(self.path, data)}
        current = data.get("current")
        if current not in versions:
            raise KeyProblem(f"{self.path}: current key version {current!r} is not in the keyring")
        # every DEK must open now, so a wrong key fails at start, not on the first read
        deks = {n: self.kek.unwrap(v.wrapped, _dek_aad(n)) for n, v in versions.items()}
        self._versions, self._current, self._deks, self._stamp = versions, current, deks, stamp
        self._checked = time.monotonic()

    def refresh(self, force: bool = False) -> None:
        """Re-read the keyring when it changed on disk (checked at most once a second)."""
        now = time.monotonic()
        if not force and now - self._checked < _RECHECK_SECONDS:
            return
        with self._lock:
            self._checked = now
            if force or self._stat() != self._stamp:
                self._load()

    # -- use ------------------------------------------------------------------------
    def current(self) -> tuple[int, bytes]:
        """(version, data key) that new objects and secrets are sealed with."""
        self.refresh()
        v = self._current
        return v, self._deks[v]

    @property
    def current_version(self) -> int:
        self.refresh()
        return self._current

    def versions(self) -> list[KeyVersion]:
        self.refresh()
        return [self._versions[n] for n in sorted(self._versions)]

    def dek(self, version: int) -> bytes:
        """The data key of `version`; raises KeyProblem when the keyring has no such version."""
        key = self._deks.get(version)
        if key is None:
            self.refresh(force=True)
            key = self._deks.get(version)
        if key is None:
            raise KeyProblem(f"key version {version} is not in the keyring {self.path} "
                            "(retired, or another node's keyring?)")
        return key

    def rotate(self) -> int:
        """Add a new version and make it current; returns it. Safe against concurrent
        rotations (file lock) and crashes (atomic replace)."""
        with _ring_lock(self.path):
            data = _read_ring(self.path)
            versions = list(_parse_versions(self.path, data))
            new = max(v.version for v in versions) + 1
            versions.append(_new_version(self.kek, new))
            _write_ring(self.path, self.kek, versions, new)
        self.refresh(force=True)
        return new

    def retire(self, keep: set[int]) -> list[int]:
        """Drop the wrapped data keys of every version not in `keep` (nor current): what
        they encrypted can no longer be read. Returns the versions dropped."""
        with _ring_lock(self.path):
            data = _read_ring(self.path)
            versions = list(_parse_versions(self.path, data))
            current = int(data["current"])
            kept = [v for v in versions if v.version in keep or v.version == current]
            dropped = sorted(v.version for v in versions if v not in kept)
            if dropped:
                _write_ring(self.path, self.kek, kept, current)
        self.refresh(force=True)
        return dropped


def _new_version(kek: KeyEncryptionKey, version: int) -> KeyVersion:
    return KeyVersion(version, _now(), kek.wrap(os.urandom(KEY_BYTES), _dek_aad(version)))


def _parse_versions(path: Path, data: dict[str, Any]) -> Iterator[KeyVersion]:
    try:
        for item in data["versions"]:
            yield KeyVersion(int(item["version"]), str(item.get("created", "")),
                             base64.b64decode(item["wrapped"], validate=True))
    except (KeyError, TypeError, ValueError):
        raise KeyProblem(f"{path}: keyring is malformed") from None


def _read_ring(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KeyProblem(f"{path}: keyring not found") from None
    except (OSError, ValueError) as exc:
        raise KeyProblem(f"{path}: keyring unreadable: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != RING_FORMAT:
        raise KeyProblem(f"{path}: not a pacsd keyring of format {RING_FORMAT}")
    return data


def _write_ring(path: Path, kek: KeyEncryptionKey, versions: list[KeyVersion],
                current: int, *, exclusive: bool = False) -> None:
    """Write the keyring atomically (temp 0600, fsync, rename or link, fsync dir)."""
    doc = {"format": RING_FORMAT, "kek": {"provider": kek.provider, "id": kek.kek_id},
           "current": current,
           "versions": [{"version": v.version, "created": v.created,
                         "wrapped": base64.b64encode(v.wrapped).decode("ascii")}
                        for v in sorted(versions, key=lambda v: v.version)]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, (json.dumps(doc, indent=1) + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if exclusive:
            os.link(tmp, path)  # FileExistsError when another process made one first
        else:
            tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


@contextlib.contextmanager
def _ring_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def create_keyring(path: str | Path, kek: KeyEncryptionKey) -> bool:
    """Create a keyring with version 1 unless one exists; True when this call made it."""
    p = Path(path)
    with _ring_lock(p):
        if p.exists():
            return False
        _write_ring(p, kek, [_new_version(kek, 1)], 1, exclusive=True)
    from pacsd import audit  # here, not at the top: audit is a heavier import

    audit.record(audit.Event.KEY_CREATE, audit.Outcome.SUCCESS, version=1, kek_id=kek.kek_id,
                 keyring=str(p))
    return True


def key_file_problem(cfg: Config) -> str | None:
    """One line on what is wrong with the key file and keyring for this config, or None.

    Used by `check-config`: with encryption on, the key must exist, be 0600, 32 bytes and
    open the keyring (when there is one).
    """
    try:
        kek = FileKEK.from_file(cfg.storage.key_file)
        if Path(cfg.storage.keyring).exists():
            Keyring(cfg.storage.keyring, kek)
    except KeyProblem as exc:
        return str(exc)
    return None


def require(cfg: Config) -> None:
    """With `[storage] encryption` on, fail early (before anything is written) when the
    key file is missing, too open, malformed or not the one that wraps the keyring.
    Raises KeyProblem with one line naming the file."""
    if not cfg.storage.encryption:
        return
    problem = key_file_problem(cfg)
    if problem is not None:
        raise KeyProblem(f"storage.key_file: {problem}")
