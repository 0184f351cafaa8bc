"""The watched inbox: Part 10 files dropped into `[inbox] directory` enter the store.

Each file goes through the same `Store.ingest` as a C-STORE (validated, SHA-256 named,
indexed, audited as `dicom.store` with calling AE "INBOX"), then moves to `done/`, or to
`failed/` next to a `NAME.reason` file saying why.

When a file is taken (files still being written are never read half-way):
  * names starting with "." or ending in ".part" or ".tmp" are never taken: writers that
    can, write under such a name and rename when complete (the safe convention);
  * a file's size, mtime and inode must stay unchanged for `settle_seconds`;
  * no process we can see (same user, or any when root) may have it open for writing
    (checked in /proc/*/fdinfo just before it is taken);
  * its Part 10 structure must be complete: a file whose last element runs past its end
    is refused as truncated (after settling, so a slow writer's pause is not mistaken).
Only regular files are read (opened with O_NOFOLLOW); symlinks and other types go to
`failed/` unread. Sub-directories are ignored.

One worker runs the inbox, holding an flock on `<directory>/.pacsd-inbox.lock`; during a
rolling reload the new worker's inbox waits until the old one has let go.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import stat
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pacsd import audit
from pacsd.config import Config
from pacsd.fsutil import fsync_dir
from pacsd.store.ingest import CANNOT_UNDERSTAND, IngestResult, Origin, Store

log = logging.getLogger("pacsd.inbox")

DONE = "done"
FAILED = "failed"
LOCK_NAME = ".pacsd-inbox.lock"
IGNORED_SUFFIXES = (".part", ".tmp")
INBOX_AE = "INBOX"


def ignored_name(name: str) -> bool:
    """Names the inbox never takes: hidden or marked as still being written."""
    return name.startswith(".") or name.lower().endswith(IGNORED_SUFFIXES)


def open_for_writing(path: Path) -> bool:
    """True when a process we can inspect has `path` open for writing (Linux /proc).

    Compares fd link names (readlink never touches the target's file system, so a hung
    mount elsewhere cannot stall the inbox), then the fd's access mode in fdinfo.
    """
    target = os.path.realpath(path)
    me = os.getpid()
    try:
        pids = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return False
    for pid in pids:
        if int(pid) == me:
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = [e.name for e in os.scandir(fd_dir)]
        except OSError:  # gone, or not ours to inspect
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") != target:  # noqa: PTH115 - a str per fd
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii") as f:
                    flags = next((int(line.split()[1], 8) for line in f
                                  if line.startswith("flags:")), 0)
            except (OSError, ValueError, IndexError):
                continue
            if flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
                return True
    return False


def truncation(path: str) -> str | None:
    """Why a Part 10 file is incomplete, or None. Reads headers; values are skipped."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("error")
            pydicom.dcmread(f, defer_size=256)
            size = os.fstat(f.fileno()).st_size
            end = f.tell()  # deferred values are skipped by seeking past their length
    except InvalidDicomError as exc:
        return f"not a DICOM Part 10 file: {str(exc)[:200]}"
    except Exception as exc:  # pydicom raises or warns in many ways on broken input
        return f"does not parse as DICOM: {str(exc)[:200]}"
    if end > size:
        return f"truncated: the last element needs {end} bytes, the file has {size}"
    return None


@dataclass
class _Seen:
    key: tuple[int, int, int]  # size, mtime_ns, inode
    since: float


class Inbox:
    """A thread that ingests settled files from one directory; start() then stop()."""

    def __init__(self, cfg: Config, store: Store) -> None:
        self.dir = Path(cfg.inbox.directory)
        self.done = self.dir / DONE
        self.failed = self.dir / FAILED
        self.settle = float(cfg.inbox.settle_seconds)
        self.interval = float(cfg.inbox.scan_interval)
        self.store = store
        self._seen: dict[str, _Seen] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer: Any = None
        self._lock_fd: int | None = None
        self.ingested = 0
        self.refused = 0

    # ---- life cycle
    def start(self) -> None:
        """Create the directories (0700 when new) and start the scanning thread."""
        for d in (self.dir, self.done, self.failed):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._watch()
        self._thread = threading.Thread(target=self._run, name="inbox", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop after the file in hand; release the lock."""
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(5)
            self._observer = None
        if self._thread is not None:
            self._thread.join(timeout)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _watch(self) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        wake = self._wake

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                wake.set()

        observer = Observer()
        observer.schedule(Handler(), str(self.dir), recursive=False)
        observer.daemon = True
        try:
            observer.start()
        except OSError as exc:  # inotify exhausted: the periodic scan still works
            log.warning("inbox: cannot watch %s: %s", self.dir, exc)
            return
        self._observer = observer

    def _take_lock(self) -> bool:
        if self._lock_fd is not None:
            return True
        fd = os.open(self.dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = self.interval
            try:
                if self._take_lock():
                    wait = self.scan()
            except Exception:  # never let one bad scan end the inbox
                log.exception("inbox: scan of %s failed", self.dir)
            self._wake.wait(wait)
            self._wake.clear()

    # ---- one scan
    def scan(self, now: float | None = None) -> float:
        """Take every settled file; returns seconds until the next scan is useful."""
        now = time.monotonic() if now is None else now
        wait = self.interval
        present: set[str] = set()
        with os.scandir(self.dir) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if self._stop.is_set():
                break
            name = entry.name
            if ignored_name(name):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                continue
            present.add(name)
            key = (st.st_size, st.st_mtime_ns, st.st_ino)
            seen = self._seen.get(name)
            if seen is None or seen.key != key:
                self._seen[name] = _Seen(key, now)
                wait = min(wait, self.settle)
                continue
            left = seen.since + self.settle - now
            if left > 0:
                wait = min(wait, left)
                continue
            if stat.S_ISREG(st.st_mode) and open_for_writing(Path(entry.path)):
                self._seen[name] = _Seen(key, now)
                wait = min(wait, self.settle)
                continue
            self._seen.pop(name, None)
            self.take(name)
        for gone in set(self._seen) - present:
            del self._seen[gone]
        return max(0.05, wait)

    def take(self, name: str) -> None:
        """Ingest one file and move it to done/ or failed/ (with NAME.reason)."""
        path = self.dir / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        except OSError as exc:
            why = ("not a regular file (symlink)" if exc.errno == errno.ELOOP
                   else f"cannot open: {exc.strerror}")
            self._failed(name, why, 0)
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self._failed(name, "not a regular file", 0)
                return
            # the same inode, reopened for the readers below (no second lookup by name)
            same = f"/proc/self/fd/{fd}"
            reason = truncation(same)
            if reason is not None:
                self._failed(name, reason, st.st_size)
                return
            origin = Origin(calling_ae=INBOX_AE, source_ip="local",
                            assoc_id=secrets.token_hex(16))
            try:
                result = self.store.ingest_part10_file(same, origin)
            except OSError as exc:
                self._failed(name, f"cannot read: {exc.strerror or exc}", st.st_size)
                return
        finally:
            os.close(fd)
        if result.ok:
            self._done(name, result, origin)
        else:
            self._failed(name, f"{result.message} (status 0x{result.status:04X})", st.st_size,
                         result, origin)

    # ---- outcomes
    def _done(self, name: str, result: IngestResult, origin: Origin) -> None:
        dest = self._move(name, self.done)
        self.ingested += 1
        with audit.association(assoc_id=origin.assoc_id, source_ip=origin.source_ip,
                               calling_ae=INBOX_AE, called_ae=self.store.cfg.node.ae_title):
            audit.record(audit.Event("dicom.store"), audit.Outcome.SUCCESS,
                         study_uid=result.study_uid, instances=1, bytes=result.size,
                         sha256=result.sha256, duplicate=result.duplicate and not result.stored,
                         file=name, moved_to=str(dest) if dest else "")
        log.info("inbox: stored %s (%s)", name, result.sha256)

    def _failed(self, name: str, reason: str, size: int, result: IngestResult | None = None,
                origin: Origin | None = None) -> None:
        dest = self._move(name, self.failed)
        if dest is not None:
            _write_reason(dest.with_name(dest.name + ".reason"), reason)
        self.refused += 1
        status = result.status if result is not None else CANNOT_UNDERSTAND
        with audit.association(assoc_id=origin.assoc_id if origin else secrets.token_hex(16),
                               source_ip="local", calling_ae=INBOX_AE,
                               called_ae=self.store.cfg.node.ae_title):
            audit.record(audit.Event("dicom.store"), audit.Outcome.SERIOUS,
                         study_uid=result.study_uid if result else "", instances=1, bytes=size,
                         reason=reason, status=status, file=name,
                         moved_to=str(dest) if dest else "")
        log.warning("inbox: refused %s: %s", name, reason)

    def _move(self, name: str, to: Path) -> Path | None:
        dest = to / name
        if dest.exists() or dest.is_symlink():
            dest = to / f"{name}.{time.strftime('%Y%m%dT%H%M%S')}.{secrets.token_hex(3)}"
        try:
            (self.dir / name).rename(dest)
        except OSError as exc:  # leave it; the next scan tries again
            log.error("inbox: cannot move %s to %s: %s", name, to, exc)
            return None
        with contextlib.suppress(OSError):
            fsync_dir(to)
            fsync_dir(self.dir)
        return dest


def _write_reason(path: Path, reason: str) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(reason.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
