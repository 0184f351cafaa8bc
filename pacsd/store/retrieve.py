"""Retrieve (C-MOVE/C-GET): which instances an identifier selects, and reading them verified.

DESIGN §5: every object is checked against its SHA-256 before a byte of it is sent; a
mismatch (or a missing file) raises `IntegrityError` and the object is never sent.

`verified_open` hands the sender (scp/sender.py) the verified open file itself, to stream
from. `verified_source` hands pynetdicom's sender a path it can stream from instead:
on Linux `/proc/self/fd/N` of the descriptor that was verified, so a file renamed over the
object between the check and the send is not what goes out; elsewhere, or when the store
returns something that is not a plain file (an encrypted envelope decrypted on read), a
private temp copy under the object root's `.tmp`, removed afterwards.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from pacsd.store.envelope import MAGIC, is_envelope
from pacsd.store.objects import READ_CHUNK, IntegrityError
from pacsd.store.query import Query, Selected, select_instances

__all__ = ["IntegrityError", "Selected", "Tally", "VerifyAhead", "path_of", "read_framed",
           "select", "verified_open", "verified_source"]

MAX_SUBOPERATIONS = 65535  # the response counts are US (PS3.4 C.4.2.3)
_PROC_FD = Path("/proc/self/fd")


class _VerifiedReader(Protocol):
    def open_verified(self, sha256: str) -> Any: ...


def select(query: Query, *, limit: int = MAX_SUBOPERATIONS) -> list[Selected]:
    """The instances a retrieve identifier selects, in study/series/instance order.

    Raises QueryError (A900 no or wildcard unique key, A700 more than `limit`).
    """
    return select_instances(query, limit=min(limit, MAX_SUBOPERATIONS))


@contextlib.contextmanager
def verified_source(store: _VerifiedReader, sha256: str,
                    tmp_dir: Path | None = None) -> Iterator[str]:
    """A path to the object's verified Part 10 bytes, valid inside the `with` block.

    Raises IntegrityError (content does not hash to its name, or missing) before anything
    is yielded.
    """
    with verified_open(store, sha256) as f, path_of(f, tmp_dir) as path:
        yield path


@contextlib.contextmanager
def verified_open(store: _VerifiedReader, sha256: str) -> Iterator[IO[bytes]]:
    """The object's verified Part 10 bytes as an open file at offset 0, closed after the
    `with` block (scp/sender.py streams from it: what it sends is what was verified).

    Raises IntegrityError (content does not hash to its name, or missing) before anything
    is yielded.
    """
    f = store.open_verified(sha256)
    try:
        yield f
    finally:
        f.close()


@contextlib.contextmanager
def path_of(f: IO[bytes], tmp_dir: Path | None = None) -> Iterator[str]:
    """A path to the whole content of `f` (a verified_open file), valid inside the block."""
    fd = _fileno(f)
    if fd is not None and _PROC_FD.is_dir():
        yield str(_PROC_FD / str(fd))
        return
    seek = getattr(f, "seek", None)
    if seek is not None:  # a sender may have read from it already
        seek(0)
    with _private_copy(f, tmp_dir) as path:
        yield path


def _fileno(f: Any) -> int | None:
    """The descriptor of a plain file opened for reading, else None.

    Only a plain `open(path, "rb")` reads the stored bytes themselves; anything else (a
    decrypting reader over an AES-GCM envelope, say) may wrap a descriptor whose bytes are
    not the plaintext, so it goes through a private copy.
    """
    if not isinstance(f, io.BufferedReader) or not isinstance(f.raw, io.FileIO):
        return None
    try:
        return int(f.fileno())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _private_copy(f: Any, tmp_dir: Path | None) -> Iterator[str]:
    fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="send-", suffix=".dcm")  # 0600
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(f, out, READ_CHUNK)
        yield name
    finally:
        with contextlib.suppress(FileNotFoundError):
            Path(name).unlink()


# A framer (scp/sender.Framer) reads a whole plain object from its descriptor straight
# into what is sent on one association, or returns None when it cannot; `pieces`
# concatenate to what it read of the file and are views into the framed buffer wherever
# its bytes are sent, so hashing them hashes the very bytes that go out.
Framer = Callable[[int, int], "tuple[Closeable, list[memoryview]] | None"]


class Closeable(Protocol):
    def close(self) -> None: ...


class VerifyAhead:
    """Opens a retrieve's objects verified, in order, the next one verified in a background
    thread while the current one is sent (hashing and file reads release the GIL, so on
    two cores the check costs the sender little wall time). An object is still never
    handed out before its check passed; one that is never asked for is closed unsent.

    With a `framer` (set once the association that carries the C-STOREs is up), a plain
    object of at most `limit` bytes is read once into memory, framed for that
    association, and the framed bytes are hashed: what is handed out (the framer's
    object) holds exactly the bytes that were verified, and nothing is read again.
    Encrypted, larger or unframeable objects are opened verified as before (a file).
    At most `depth` objects are held ahead (two: slack for the thread's scheduling on a
    busy machine, ~1 MB for 0.5 MB objects).
    """

    def __init__(self, store: _VerifiedReader, order: list[Selected], *,
                 framer: Framer | None = None, limit: int = 8 * 1024 * 1024,
                 depth: int = 2) -> None:
        self._store = store
        self._order = order
        self._index = {s.sha256 + s.sop_instance_uid: i for i, s in enumerate(order)}
        self._queued: collections.deque[tuple[str, Future[Any]]] = collections.deque()
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        self.framer = framer
        self.limit = limit
        self.depth = depth  # objects held verified ahead, at most

    def open(self, sel: Selected) -> Any:
        """`sel`'s verified file at offset 0, or the framer's object for it (the caller
        closes either); raises IntegrityError. Starts verifying the objects after `sel`."""
        key = sel.sha256 + sel.sop_instance_uid
        found: Future[Any] | None = None
        while self._queued:  # anything verified ahead of `sel` was skipped: closed
            k, fut = self._queued.popleft()
            if k == key:
                found = fut
                break
            _discard(fut)
        try:
            return found.result() if found is not None else self._load(sel)
        finally:
            self._ahead(key)

    def _load(self, sel: Selected) -> Any:
        framer = self.framer
        if framer is not None and sel.size <= self.limit:
            framed = read_framed(self._store, sel.sha256, framer, self.limit)
            if framed is not None:
                return framed
        return self._store.open_verified(sel.sha256)

    def _ahead(self, key: str) -> None:
        i = self._index.get(key)
        if self._closed or i is None:
            return
        queued = {k for k, _ in self._queued}
        for after in self._order[i + 1:i + 1 + self.depth]:
            k = after.sha256 + after.sop_instance_uid
            if k in queued:
                continue
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="pacsd-verify",
                                                initializer=_lower_priority)
            self._queued.append((k, self._pool.submit(self._load, after)))

    def close(self) -> None:
        """Close what was verified but not asked for; stop the thread (idempotent)."""
        self._closed = True
        while self._queued:
            _discard(self._queued.popleft()[1])
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def read_framed(store: Any, sha256: str, framer: Framer, limit: int) -> Closeable | None:
    """A plain stored object read once, framed by `framer`, and verified over the framed
    bytes; None when it is encrypted, larger than `limit`, not framed, or the store has
    no plain files (the caller then opens it verified as a file).

    Raises IntegrityError when it is missing or does not hash to its name.
    """
    objects = getattr(store, "objects", store)
    path_for = getattr(objects, "path_for", None)
    if path_for is None:
        return None
    p = path_for(sha256)
    try:
        f = open(p, "rb", buffering=0)  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise IntegrityError.missing(p, sha256) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size > limit or is_envelope(os.pread(f.fileno(), len(MAGIC), 0)):
            return None
        framed = framer(f.fileno(), size)
        if framed is None:
            return None
        obj, pieces = framed
        h = hashlib.sha256()
        for piece in pieces:
            h.update(piece)
        del pieces
    actual = h.hexdigest()
    if actual != sha256:
        obj.close()
        raise IntegrityError.mismatch(p, sha256, actual)
    return obj


# Niceness of the verify-ahead thread. Its work is read-ahead with slack (`depth` objects),
# so when the cores are busy the sending thread, other associations' work and, on a
# shared machine, the destination itself go first (bench/retrieve, where storescp shares
# the two cores: docs/query.md).
VERIFY_NICE = 10  # added to the process's niceness


def _lower_priority() -> None:
    """Runs in the verify-ahead thread: lower its own priority (Linux: per thread; raising
    one's niceness needs no privilege). Where not allowed (a seccomp filter), it stays."""
    with contextlib.suppress(OSError, AttributeError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid,
                       min(19, os.getpriority(os.PRIO_PROCESS, tid) + VERIFY_NICE))


def _discard(fut: Future[Any]) -> None:
    def close(done: Future[Any]) -> None:
        with contextlib.suppress(Exception):  # its failure was never part of a send
            done.result().close()

    fut.add_done_callback(close)


@dataclass
class Tally:
    """What one retrieve did, for its audit record and its final response."""

    selected: int = 0
    completed: int = 0
    warning: int = 0
    failed: int = 0
    bytes: int = 0
    failed_uids: list[str] = field(default_factory=list)
    integrity_failures: int = 0
    studies: set[str] = field(default_factory=set)

    @property
    def remaining(self) -> int:
        return self.selected - self.completed - self.warning - self.failed

    def done(self, sel: Selected, outcome: str) -> None:
        """Count one sub-operation: outcome is 'success', 'warning' or 'failure'."""
        self.studies.add(sel.study_uid)
        if outcome == "success":
            self.completed += 1
            self.bytes += sel.size
        elif outcome == "warning":
            self.warning += 1
            self.bytes += sel.size
        else:
            self.failed += 1
            self.failed_uids.append(sel.sop_instance_uid)
