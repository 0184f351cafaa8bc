"""Object files: content-addressed layout, spooling, atomic publish and verified reads.

Layout: `root/ab/cd/<sha256>.dcm`, named by the SHA-256 of the exact Part 10 bytes;
temp files live in `root/.tmp/` (same file system, so publishing is a rename). Nothing
here builds a path from anything but a validated hex digest.

Temp files are locked (flock) by the process writing them while they are open, so a
sweep or `verify` in another process (a restarted worker, the admin CLI) never takes an
in-flight spool for a crash leftover.
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
from typing import IO, Any

from pacsd.errors import ProblemFound

HEAD_SIZE = 256 * 1024  # first bytes kept in memory: enough for any header we index
_BUFFER = 256 * 1024  # small writes are gathered up to this size before a syscall
READ_CHUNK = 1024 * 1024
TMP_DIR = ".tmp"
SUFFIX = ".dcm"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class IntegrityError(ProblemFound):
    """A stored object does not hash to its name (or is missing): never send it."""

    def __init__(self, message: str, *, sha256: str, path: Path, actual: str | None) -> None:
        super().__init__(message)
        self.sha256 = sha256
        self.path = path
        self.actual = actual  # None when the file is missing


def _fsync(fd: int) -> None:
    os.fsync(fd)


def _sync_directory(path: str | Path) -> None:
    """fsync a directory so a rename or a new entry in it survives power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    sets `over_limit`; the caller then refuses the object (A700).
    """

    def __init__(self, dir: str | Path, *, limit: int | None = None, **_ignored: Any) -> None:
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
        self.synced = False
        self._fd: int | None = fd
        self._hash = hashlib.sha256()
        self._head = bytearray()
        self._pending = bytearray()
        self._digest: str | None = None

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
        if len(self._pending) + n < _BUFFER:
            self._pending += data
        else:
            _write_all(self._fd, [self._pending, data])
            self._pending.clear()
        return n

    def flush(self) -> None:
        """Hand buffered bytes to the OS (no fsync)."""
        if self._fd is not None and self._pending:
            _write_all(self._fd, [self._pending])
            self._pending.clear()

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError("spool file is closed")
        return self._fd

    def finish(self) -> str:
        """Flush, fsync and fix the digest; the file stays open (and locked). Returns sha256."""
        if self._digest is None:
            self.flush()
            self._digest = self._hash.hexdigest()
        if not self.synced and self._fd is not None:
            _fsync(self._fd)
            self.synced = True
        return self._digest

    def close(self) -> None:
        """Flush and close (no fsync); idempotent. The digest is fixed from here on."""
        if self._fd is None:
            return
        try:
            if self._digest is None:
                self.flush()
                self._digest = self._hash.hexdigest()
        finally:
            os.close(self._fd)
            self._fd = None

    def abort(self) -> None:
        """Close and remove the temp file; idempotent, never raises for a missing file."""
        try:
            self.close()
        finally:
            Path(self.name).unlink(missing_ok=True)

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

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.tmp = self.root / TMP_DIR
        self._known_dirs: set[str] = set()

    def ensure(self) -> None:
        """Create root and root/.tmp (0700) if missing."""
        for d in (self.root, self.tmp):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    def path_for(self, sha256: str) -> Path:
        """root/ab/cd/<sha256>.dcm; raises ValueError for anything but 64 lowercase hex."""
        if not is_sha256(sha256):
            raise ValueError(f"not a SHA-256 hex digest: {sha256[:80]!r}")
        return self.root / sha256[0:2] / sha256[2:4] / (sha256 + SUFFIX)

    def spool(self, *, limit: int | None = None) -> SpoolFile:
        return SpoolFile(self.tmp, limit=limit)

    def _ensure_dir(self, directory: Path) -> None:
        key = str(directory)
        if key in self._known_dirs:
            return
        created = []
        for d in (directory.parent, directory):
            try:
                d.mkdir(0o700)
                created.append(d)
            except FileExistsError:
                pass
        for d in created:  # a new directory entry must be durable too
            _sync_directory(d.parent)
        self._known_dirs.add(key)

    def publish(self, spool: SpoolFile) -> Path:
        """fsync the spool and hard-link it at its content address; fsync the directory.

        The temp name stays as a marker until the caller has committed the index row and
        calls spool.abort() (which then only drops the marker): a crash in between leaves
        a temp file with a second link, and the next sweep removes both when no row
        references the object. An object with the same digest already there is replaced
        by this identical, freshly written copy (which also heals a damaged one).
        Raises OSError.
        """
        sha = spool.finish()
        dest = self.path_for(sha)
        self._ensure_dir(dest.parent)
        try:
            self._link_or_replace(spool.name, dest)
        except FileNotFoundError:
            # the directory vanished under us (e.g. removed by an operator): recreate once
            self._known_dirs.discard(str(dest.parent))
            self._ensure_dir(dest.parent)
            self._link_or_replace(spool.name, dest)
        _sync_directory(dest.parent)
        return dest

    @staticmethod
    def _link_or_replace(src: str, dest: Path) -> None:
        try:
            os.link(src, dest)
        except FileExistsError:
            Path(src).replace(dest)

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

    # -- verified reads ---------------------------------------------------------------
    def open_verified(self, sha256: str) -> IO[bytes]:
        """Open an object after recomputing its SHA-256 (streamed); the file is at offset 0.

        Raises IntegrityError when it is missing or its content does not match its name.
        """
        p = self.path_for(sha256)
        try:
            f = open(p, "rb")  # noqa: SIM115 - returned open to the caller
        except FileNotFoundError:
            raise IntegrityError(f"{p}: object missing", sha256=sha256, path=p,
                                 actual=None) from None
        try:
            actual = _hash_stream(f)
            if actual != sha256:
                raise IntegrityError(f"{p}: content hashes to {actual}, not its name",
                                     sha256=sha256, path=p, actual=actual)
            f.seek(0)
        except BaseException:
            f.close()
            raise
        return f

    def verified_path(self, sha256: str) -> Path:
        """The object's path after its SHA-256 was checked; raises IntegrityError."""
        with self.open_verified(sha256):
            pass
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
                if p.stat().st_nlink > 1 and is_referenced is not None:
                    sha = hash_file(p)
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
