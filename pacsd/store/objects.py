"""Object files: content-addressed layout, spooling, atomic publish and verified reads.

Layout: `root/ab/cd/<sha256>.dcm`, named by the SHA-256 of the exact Part 10 bytes;
temp files live in `root/.tmp/` (same file system, so publishing is a rename). Nothing
here builds a path from anything but a validated hex digest.

Temp files are locked (flock) by the process writing them while they are open, so a
sweep or `verify` in another process (a restarted worker, the admin CLI) never takes an
in-flight spool for a crash leftover.

Encryption at rest (`[storage] encryption`, issue 7): the spool encrypts as it writes
(`store.envelope`), so plaintext never reaches the disk; the name is still the SHA-256
of the plaintext. Reads tell envelope from plaintext by the first bytes, so a store may
hold both (while `pacsd key encrypt-existing` runs, or after encryption is switched off).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO

from pacsd.errors import ProblemFound
from pacsd.fsutil import fsync_dir as _sync_directory
from pacsd.keys import KeyProblem, Keyring
from pacsd.store.envelope import MAGIC, TAG, EnvelopeError, Opener, Sealer, is_envelope

HEAD_SIZE = 256 * 1024  # first bytes kept in memory: enough for any header we index
_BUFFER = 256 * 1024  # small writes are gathered up to this size before a syscall
READ_CHUNK = 1024 * 1024
_MEMFD_MAX = 32 * 1024 * 1024  # decrypted reads up to this size stay in memory (memfd)
TMP_DIR = ".tmp"
SUFFIX = ".dcm"
PUBLISH_PREFIX = "pub-"  # root/.tmp/pub-<sha256>-<spool>.tmp: a spool being published
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class IntegrityError(ProblemFound):
    """A stored object does not hash to its name (or is missing): never send it."""

    def __init__(self, message: str, *, sha256: str, path: Path, actual: str | None) -> None:
        super().__init__(message)
        self.sha256 = sha256
        self.path = path
        self.actual = actual  # None when the file is missing

    @classmethod
    def missing(cls, path: Path, sha256: str) -> IntegrityError:
        return cls(f"{path}: object missing", sha256=sha256, path=path, actual=None)

    @classmethod
    def mismatch(cls, path: Path, sha256: str, actual: str) -> IntegrityError:
        return cls(f"{path}: content hashes to {actual}, not its name", sha256=sha256,
                   path=path, actual=actual)


def _fsync(fd: int) -> None:
    os.fsync(fd)


def _write_all(fd: int, buffers: list[Any]) -> None:
    """os.writev until every byte is written (writev may write less than asked)."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def is_sha256(value: str) -> bool:
    return bool(_HEX64.match(value))


def hash_file(path: str | Path) -> str:
    """SHA-256 hex of a file, read in chunks (memory stays flat)."""
    with open(path, "rb", buffering=0) as f:
        return _hash_stream(f)


def _hash_stream(f: IO[bytes]) -> str:
    h = hashlib.sha256()
    buf = bytearray(READ_CHUNK)
    view = memoryview(buf)
    while True:
        n = f.readinto(view)  # type: ignore[attr-defined]
        if not n:
            return h.hexdigest()
        h.update(view[:n])


class _NoFlush:
    """Stands in for `NamedTemporaryFile.file`: pynetdicom flushes per fragment; we
    fsync once at the end instead."""

    def flush(self) -> None:
        return None


class SpoolFile:
    """A temp file in `dir` that hashes and counts every byte written to it.

    Compatible with how pynetdicom uses `NamedTemporaryFile(delete=False, mode="wb",
    suffix=".dcm")` for chunked C-STORE receipt (extra keyword arguments are ignored).
    `limit` (bytes, None = unlimited): beyond it the spool stops writing to disk and
    sets `over_limit`; the caller then refuses the object (A700). With a `sealer` the
    file is an envelope: whole chunks are encrypted as they fill, the final one at
    finish()/close(); `sha256`, `size` and `head` are always of the plaintext.
    """

    def __init__(self, dir: str | Path, *, limit: int | None = None,
                 sealer: Sealer | None = None, dek: bytes | None = None,
                 **_ignored: Any) -> None:
        fd, name = tempfile.mkstemp(dir=dir, prefix="spool-", suffix=".tmp")  # 0600, O_EXCL
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise
        self.name: str = name
        self.file = _NoFlush()
        self.size = 0
        self.limit = limit
        self.over_limit = limit is not None and limit <= 0
        self.disk_full = False  # the file system filled while writing (ENOSPC/EDQUOT)
        self.synced = False
        self._fd: int | None = fd
        self._hash = hashlib.sha256()
        self._head = bytearray()
        self._pending = bytearray()
        self._digest: str | None = None
        self._sealer = sealer
        self._dek = dek  # to read back our own envelope (open_plaintext)
        self._sealed = False
        if sealer is not None:  # one plaintext chunk and one ciphertext buffer, reused
            self._chunk = bytearray(sealer.chunk)
            self._fill = 0
            self._out = bytearray(sealer.chunk + TAG)
        if sealer is not None:
            try:
                _write_all(fd, [sealer.header()])
            except BaseException:
                self.abort()
                raise

    @property
    def key_version(self) -> int | None:
        """The key version of the envelope being written; None for a plaintext file."""
        return None if self._sealer is None else self._sealer.version

    # -- writing --------------------------------------------------------------------
    def write(self, data: Any) -> int:
        """Append bytes (any buffer); returns their length."""
        if self._fd is None or self._digest is not None:
            raise ValueError("write to a closed spool file")
        n = len(data) if isinstance(data, bytes | bytearray) else memoryview(data).nbytes
        if not n:
            return 0
        self.size += n
        if self.over_limit:
            return n
        if self.limit is not None and self.size > self.limit:
            self.over_limit = True
            self._pending.clear()
            os.ftruncate(self._fd, 0)  # give the space back at once
            return n
        self._hash.update(data)
        if len(self._head) < HEAD_SIZE:
            self._head += memoryview(data).cast("B")[: HEAD_SIZE - len(self._head)]
        if self._sealer is not None:
            self._guarded(self._fill_and_seal, data, n)
            return n
        if len(self._pending) + n < _BUFFER:
            self._pending += data
        else:
            self._guarded(_write_all, self._fd, [self._pending, data])
            self._pending.clear()
        return n

    def _guarded(self, write: Any, *args: Any) -> None:
        """Run a write; a full file system turns the spool into a counter (over_limit,
        disk_full) so that the caller refuses the object with A700, instead of the error
        escaping into pynetdicom's receive path and aborting the association (issue 9)."""
        try:
            write(*args)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or self._fd is None:
                raise
            self.over_limit = True
            self.disk_full = True
            self._pending = bytearray()  # not clear(): the failed write's views still exist
            os.ftruncate(self._fd, 0)  # give the space back at once

    def _fill_and_seal(self, data: Any, n: int) -> None:
        """Copy into the chunk buffer; each full chunk is sealed and written at once."""
        assert self._sealer is not None and self._fd is not None
        src = memoryview(data).cast("B")
        chunk, size = self._chunk, len(self._chunk)
        fill, off = self._fill, 0
        while off < n:
            take = min(size - fill, n - off)
            chunk[fill:fill + take] = src[off:off + take]
            fill += take
            off += take
            if fill == size:
                _write_all(self._fd, [self._sealer.seal_into(chunk, self._out)])
                fill = 0
        self._fill = fill

    def _seal_final(self) -> None:
        """Write the final (short) chunk: the envelope is complete from here on."""
        if self._sealer is not None and not self._sealed and self._fd is not None:
            if not self.over_limit:
                last = memoryview(self._chunk)[: self._fill]
                _write_all(self._fd, [self._sealer.seal_into(last, self._out, final=True)])
            self._fill = 0
            self._sealed = True

    def flush(self) -> None:
        """Hand buffered bytes to the OS (no fsync); an envelope holds back its last,
        partial chunk until finish()."""
        if self._sealer is not None:
            return
        if self._fd is not None and self._pending:
            _write_all(self._fd, [self._pending])
            self._pending.clear()

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError("spool file is closed")
        return self._fd

    def digest(self) -> str:
        """Flush to the OS (no fsync) and fix the digest; the file stays open. sha256."""
        if self._digest is None:
            self.flush()
            self._seal_final()
            self._digest = self._hash.hexdigest()
        return self._digest

    def rename(self, name: str) -> None:
        """Move the temp file to another name in the same directory (open, locked)."""
        os.rename(self.name, name)  # noqa: PTH104 - str paths on the hot path
        self.name = name

    def finish(self) -> str:
        """Flush, fsync and fix the digest; the file stays open (and locked). Returns sha256."""
        digest = self.digest()
        if not self.synced and self._fd is not None:
            _fsync(self._fd)
            self.synced = True
        return digest

    def close(self) -> None:
        """Flush and close (no fsync); idempotent. The digest is fixed from here on."""
        if self._fd is None:
            return
        try:
            if self._digest is None:
                self.flush()
                self._seal_final()
                self._digest = self._hash.hexdigest()
        finally:
            os.close(self._fd)
            self._fd = None

    def abort(self) -> None:
        """Close and remove the temp file; idempotent, never raises for a missing file."""
        try:
            self.close()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.name)  # noqa: PTH108 - str paths on the hot path

    def open_plaintext(self) -> BinaryIO:
        """A reader of everything written so far, as plaintext (for headers beyond
        `head`). An envelope is finished (sealed, fsynced) first. Raises OSError."""
        if self._sealer is None:
            self.flush()
            return open(self.name, "rb")
        self.finish()
        dek = self._dek
        if dek is None:
            raise ValueError("spool has no data key to read its envelope back")
        return Opener(open(self.name, "rb"), lambda _v: dek)  # type: ignore[return-value]

    # -- results --------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._fd is None

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of everything written; only after finish() or close()."""
        if self._digest is None:
            raise ValueError("sha256 is known only after finish() or close()")
        return self._digest

    @property
    def head(self) -> bytes:
        """The first HEAD_SIZE bytes written (all of them for a small object)."""
        return bytes(self._head)

    @property
    def head_complete(self) -> bool:
        """True when `head` holds the whole file."""
        return len(self._head) == self.size

    def __del__(self) -> None:
        # A receive that never reached ingest (association aborted mid-transfer): the
        # DIMSE message holding us is dropped, so the descriptor and temp file go too.
        if getattr(self, "_fd", None) is not None:
            with contextlib.suppress(Exception):
                self.abort()

    def __enter__(self) -> SpoolFile:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


class ObjectStore:
    """The object files under one root; thread-safe (no mutable state beyond a dir cache)."""

    def __init__(self, root: str | Path, *, keys: Keyring | Callable[[], Keyring] | None = None,
                 encrypt: bool = False) -> None:
        """`keys`: the keyring, or a function that loads it when an envelope is first met
        (so a plaintext store never needs the key file). `encrypt`: new objects are
        written as envelopes under the keyring's current version (needs `keys`)."""
        self.root = Path(root)
        self.tmp = self.root / TMP_DIR
        self._root, self._tmp = str(self.root), str(self.tmp)  # the hot path joins strings
        self._known_dirs: set[str] = set()
        self._keys = keys
        self.encrypt = encrypt
        if encrypt and keys is None:
            raise ValueError("encryption needs a keyring")

    @classmethod
    def for_config(cls, cfg: Any) -> ObjectStore:
        """The object store of a node: with `[storage] encryption` the keyring is loaded
        now (created when missing); otherwise only when an envelope is met.
        Raises KeyProblem."""
        if cfg.storage.encryption:
            return cls(cfg.storage.root, keys=Keyring.open(cfg, create=True), encrypt=True)
        return cls(cfg.storage.root, keys=lambda: Keyring.open(cfg))

    @property
    def keys(self) -> Keyring:
        """The keyring (loading it on first use); raises KeyProblem."""
        if self._keys is None:
            raise KeyProblem("an encrypted object needs the storage key; none is configured")
        if not isinstance(self._keys, Keyring):
            self._keys = self._keys()
        return self._keys

    def dek(self, version: int) -> bytes:
        return self.keys.dek(version)

    def ensure(self) -> None:
        """Create root, root/.tmp and the 256 first-level directories (0700) if missing.

        With the first level in place, an object in a new second-level directory costs
        one directory fsync fewer (the parent's, not also the root's)."""
        for d in (self.root, self.tmp):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        created = False
        for i in range(256):
            try:
                (self.root / f"{i:02x}").mkdir(0o700)
                created = True
            except FileExistsError:
                pass
        if created:
            _sync_directory(self.root)

    def path_for(self, sha256: str) -> Path:
        """root/ab/cd/<sha256>.dcm; raises ValueError for anything but 64 lowercase hex."""
        if not is_sha256(sha256):
            raise ValueError(f"not a SHA-256 hex digest: {sha256[:80]!r}")
        return self.root / sha256[0:2] / sha256[2:4] / (sha256 + SUFFIX)

    def spool(self, *, limit: int | None = None, encrypt: bool | None = None) -> SpoolFile:
        """A new SpoolFile in root/.tmp; an envelope under the current key version when
        this store encrypts (or `encrypt` says so)."""
        if self.encrypt if encrypt is None else encrypt:
            version, dek = self.keys.current()
            return SpoolFile(self._tmp, limit=limit, sealer=Sealer(version, dek), dek=dek)
        return SpoolFile(self._tmp, limit=limit)

    def _ensure_dir(self, directory: Path | str) -> list[str]:
        """Create the directory (and its parent) if missing, without fsync; returns the
        parents whose new entries the caller must make durable."""
        key = str(directory)
        if key in self._known_dirs:
            return []
        parents = []
        parent = key.rsplit("/", 1)[0]
        for d in (parent, key):
            try:
                os.mkdir(d, 0o700)  # noqa: PTH102 - str paths on the hot path
                parents.append(d.rsplit("/", 1)[0])
            except FileExistsError:
                pass
        self._known_dirs.add(key)
        return parents

    def publish(self, spool: SpoolFile) -> Path:
        """Hard-link the spool at its content address and make it durable: the file,
        its directory entry and any directory created for it.

        The spool is first renamed to root/.tmp/pub-<sha256>-<spool>.tmp (unique: the
        same object may be published from several threads at once) and keeps that name as a
        marker until the caller has committed the index row and calls spool.abort()
        (which then only drops the marker): a crash in between leaves the marker with a
        second link, and the next sweep removes both when no row references the object
        (the name says where the object is even if power was lost before its bytes
        reached the disk). A new object is linked before the one fsync of its data, so
        on a journalling file system that fsync also commits the new directory entries
        and the directory fsyncs after it find nothing left to write. An object with
        the same digest already there is replaced only after this copy is on disk (which
        also heals a damaged one). Raises OSError.
        """
        sha = spool.digest()
        if not is_sha256(sha):
            raise ValueError(f"not a SHA-256 hex digest: {sha[:80]!r}")
        directory = f"{self._root}/{sha[0:2]}/{sha[2:4]}"
        dest = f"{directory}/{sha}{SUFFIX}"
        spool.rename(f"{self._tmp}/{PUBLISH_PREFIX}{sha}-{spool.name.rsplit('/', 1)[-1]}")
        parents = self._ensure_dir(directory)
        try:
            linked = self._link_new(spool, dest)
        except FileNotFoundError:
            # the directory vanished under us (e.g. removed by an operator): recreate once
            self._known_dirs.discard(directory)
            parents += self._ensure_dir(directory)
            linked = self._link_new(spool, dest)
        spool.finish()
        if not linked:
            os.replace(spool.name, dest)  # noqa: PTH105 - str paths on the hot path
        _sync_directory(directory)
        for d in parents:  # a new directory entry must be durable too
            _sync_directory(d)
        return Path(dest)

    @staticmethod
    def _link_new(spool: SpoolFile, dest: str) -> bool:
        """Link the spool at dest; False when an object is already there."""
        try:
            os.link(spool.name, dest)
        except FileExistsError:
            return False
        return True

    def replace_with(self, spool: SpoolFile) -> Path:
        """Atomically put a finished spool in place of the object of the same digest
        (rename over it; the directory fsynced): a reader sees the old file or the new,
        never a mix. Used by rewrap and encrypt-existing. Raises OSError."""
        sha = spool.finish()
        dest = self.path_for(sha)
        parents = self._ensure_dir(dest.parent)
        Path(spool.name).replace(dest)
        _sync_directory(dest.parent)
        for d in parents:
            _sync_directory(d)
        return dest

    @contextlib.contextmanager
    def removal_marker(self, sha256: str) -> Iterator[None]:
        """While the block runs, a locked second link to the object sits in root/.tmp.

        Used around an index change that may leave the object unreferenced (replace): if
        the process dies before the caller removes it, the start-up sweep finds the
        marker and removes the object when no row references it any more.
        """
        src = self.path_for(sha256)
        marker = self.tmp / f"replaced-{secrets.token_hex(8)}.tmp"
        fd: int | None = None
        try:
            os.link(src, marker)
            fd = os.open(marker, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except FileNotFoundError:
            pass  # no object (or a sweep took the marker): nothing to protect
        except OSError:
            if fd is not None:
                os.close(fd)
                fd = None
        try:
            yield
        finally:
            marker.unlink(missing_ok=True)
            if fd is not None:
                os.close(fd)

    def remove(self, sha256: str) -> bool:
        """Unlink an object (durably); False when it was not there."""
        p = self.path_for(sha256)
        try:
            p.unlink()
        except FileNotFoundError:
            return False
        _sync_directory(p.parent)
        return True

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    # -- reading ------------------------------------------------------------------------
    def open_plaintext(self, path: str | Path) -> IO[bytes]:
        """Open a stored file as a stream of its plaintext (decrypting an envelope, which
        raises EnvelopeError on a chunk that fails its tag). Not verified against the name.
        Raises FileNotFoundError, KeyProblem (no key for an envelope), EnvelopeError."""
        f = open(path, "rb")  # noqa: SIM115 - returned open to the caller
        try:
            if not is_envelope(f.read(len(MAGIC))):
                f.seek(0)
                return f
            f.seek(0)
            return Opener(f, self.dek)  # type: ignore[return-value]
        except BaseException:
            f.close()
            raise

    def hash_object(self, path: str | Path) -> str:
        """SHA-256 of a stored file's plaintext (GCM tags checked on the way).
        Raises FileNotFoundError, EnvelopeError, KeyProblem."""
        with self.open_plaintext(path) as f:
            if isinstance(f, Opener):
                h = hashlib.sha256()
                for chunk in f.chunks():
                    h.update(chunk)
                return h.hexdigest()
            return _hash_stream(f)

    def key_version_of(self, sha256: str) -> int | None:
        """The key version in an object's envelope header; None for a plaintext file.
        Raises FileNotFoundError, EnvelopeError."""
        from pacsd.store.envelope import read_header

        with open(self.path_for(sha256), "rb") as f:
            if not is_envelope(f.read(len(MAGIC))):
                return None
            f.seek(0)
            return read_header(f).version

    def _open_decrypted(self, sha256: str, p: Path, f: IO[bytes]) -> IO[bytes]:
        """Decrypt an envelope into a private unnamed file (memfd for small objects, an
        unlinked temp file under root/.tmp for large ones) while hashing; returns it at
        offset 0, verified. Closes `f`. Raises IntegrityError."""
        size = os.fstat(f.fileno()).st_size
        if size <= _MEMFD_MAX and hasattr(os, "memfd_create"):
            out = os.fdopen(os.memfd_create("pacsd-read", os.MFD_CLOEXEC), "w+b")
        else:
            out = tempfile.TemporaryFile(dir=self.tmp, prefix="read-")  # noqa: SIM115
        try:
            h = hashlib.sha256()
            try:
                with Opener(f, self.dek) as src:
                    for chunk in src.chunks():
                        h.update(chunk)
                        out.write(chunk)
            except EnvelopeError as exc:
                raise IntegrityError(f"{p}: {exc}", sha256=sha256, path=p,
                                     actual="") from None
            actual = h.hexdigest()
            if actual != sha256:
                raise IntegrityError(f"{p}: content decrypts to {actual}, not its name",
                                     sha256=sha256, path=p, actual=actual)
            out.flush()
            out.seek(0)
        except BaseException:
            out.close()
            raise
        return out

    def open_verified(self, sha256: str) -> IO[bytes]:
        """Open an object's plaintext after recomputing its SHA-256 (streamed); at offset 0.

        An encrypted object is decrypted (every GCM tag checked) into a private unnamed
        file that holds the verified plaintext and vanishes when closed; its descriptor
        is a plaintext file, so /proc/self/fd/N works as a path for a sender.
        Raises IntegrityError when it is missing, fails a tag or does not match its name;
        KeyProblem when its key version is not available.
        """
        p = self.path_for(sha256)
        try:
            f = open(p, "rb")  # noqa: SIM115 - returned open to the caller
        except FileNotFoundError:
            raise IntegrityError.missing(p, sha256) from None
        try:
            if is_envelope(f.read(len(MAGIC))):
                f.seek(0)
                return self._open_decrypted(sha256, p, f)
            f.seek(0)
            actual = _hash_stream(f)
            if actual != sha256:
                raise IntegrityError.mismatch(p, sha256, actual)
            f.seek(0)
        except BaseException:
            f.close()
            raise
        return f

    def verified_path(self, sha256: str) -> Path:
        """The object's path after its SHA-256 was checked; raises IntegrityError.

        Plaintext objects only (the path of an envelope is ciphertext): raises ValueError
        for an encrypted one; use open_verified (or retrieve.verified_source) instead.
        """
        with self.open_verified(sha256) as f:
            if getattr(f, "name", None) != str(self.path_for(sha256)):
                raise ValueError(f"object {sha256} is encrypted: use open_verified")
        return self.path_for(sha256)

    # -- housekeeping ---------------------------------------------------------------
    def temp_leftovers(self) -> Iterator[Path]:
        """Temp files no live process holds (crash leftovers)."""
        try:
            entries = list(os.scandir(self.tmp))
        except FileNotFoundError:
            return
        for entry in entries:
            if not entry.is_file(follow_symlinks=False):
                continue
            if not _in_use(entry.path):
                yield Path(entry.path)

    def sweep_tmp(self, is_referenced: Callable[[str], bool] | None = None) -> int:
        """Remove crash leftovers from root/.tmp; returns how many were removed.

        A leftover with a second link was published but maybe never indexed: its object
        is removed too unless `is_referenced(sha256)` says a row points to it (without
        the callback such objects are left alone).
        """
        removed = 0
        for p in list(self.temp_leftovers()):
            try:
                named = p.name[len(PUBLISH_PREFIX):len(PUBLISH_PREFIX) + 64]
                if (p.name.startswith(PUBLISH_PREFIX) and is_sha256(named)
                        and is_referenced is not None):
                    # the object may hold less than its name says (power lost before
                    # its fsync); the marker names it, and no row may point to it yet
                    dest = self.path_for(named)
                    if (p.stat().st_nlink > 1 and dest.exists() and dest.samefile(p)
                            and not is_referenced(named)):
                        self.remove(named)
                elif p.stat().st_nlink > 1 and is_referenced is not None:
                    try:
                        sha = self.hash_object(p)
                    except Exception:  # an envelope we cannot open: leave the object
                        p.unlink()
                        removed += 1
                        continue
                    dest = self.path_for(sha)
                    if dest.exists() and dest.samefile(p) and not is_referenced(sha):
                        self.remove(sha)
                p.unlink()
                removed += 1
            except FileNotFoundError:
                pass
        if removed:
            _sync_directory(self.tmp)
        return removed

    def walk(self) -> Iterator[tuple[Path, str | None]]:
        """Every file under root except .tmp, with its digest when the name is a valid
        object name in the right place (else None: a stray file)."""
        for top in sorted(os.scandir(self.root), key=lambda e: e.name):
            if top.name == TMP_DIR:
                continue
            if not top.is_dir(follow_symlinks=False):
                yield Path(top.path), None
                continue
            for dirpath, dirnames, filenames in os.walk(top.path):
                dirnames.sort()
                for fn in sorted(filenames):
                    p = Path(dirpath) / fn
                    sha = fn[: -len(SUFFIX)] if fn.endswith(SUFFIX) else ""
                    if is_sha256(sha) and p == self.path_for(sha):
                        yield p, sha
                    else:
                        yield p, None


def _in_use(path: str) -> bool:
    """True when another open file description holds the spool lock on `path`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return True  # vanished or unreadable: not ours to remove
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return True
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)
    return False
