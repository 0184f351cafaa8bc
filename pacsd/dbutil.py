"""SQLite helpers shared by the auth and index databases: open with WAL, versioned migrations,
connections that do not outlive their use.

Why connections are closed when idle, not just when their thread ends (issue 9): in WAL
mode every open SQLite connection holds a POSIX read lock on the database file. Closing a
descriptor drops all of the process's POSIX locks on that file, so SQLite does not close
the descriptor of a connection closed while another connection of the same process still
holds its lock: it parks it and closes the parked descriptors only when the last
connection to the file closes. One long-lived connection (the worker's main thread after
start-up, the accept thread's source-block check, the commitment dispatcher) therefore
kept the database descriptors of every association thread that had ever run concurrently
open for good: after a burst of 32 associations a worker held ~34 descriptors per
database. Here a connection is closed when its thread ends and, in any thread, once it
has been idle for IDLE_CLOSE seconds (no cursor alive, no transaction open); the thread's
next query opens a fresh one. With every connection of an idle worker closed, SQLite
closes the parked descriptors too.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import peewee

from pacsd.errors import EnvironmentProblem

Migration = Callable[[peewee.SqliteDatabase], None]

PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": 2,  # FULL: a committed row survives power loss (DESIGN §5)
    "foreign_keys": 1,
    "busy_timeout": 10_000,  # ms; admin commands and workers share the files
    "cache_size": -16_000,  # 16 MB page cache per connection
    "temp_store": 2,
}


IDLE_CLOSE = 2.0  # seconds without a live cursor or transaction before a connection closes
SWEEP_EVERY = 1.0


class _Conn:
    """One thread's connection and what the idle sweeper needs to close it safely.

    Held strongly only by its thread's peewee state (thread-local): when the thread ends,
    CPython drops that storage and __del__ closes the connection at once, rather than
    whenever the cyclic garbage collector finds it."""

    __slots__ = ("__weakref__", "closed", "conn", "cursors", "last_use", "lock")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.cursors: weakref.WeakSet[sqlite3.Cursor] = weakref.WeakSet()
        self.last_use = time.monotonic()
        self.closed = False

    def close_if_idle(self, now: float) -> bool:
        """Close when no cursor of it is alive, no transaction is open and it has not been
        used for IDLE_CLOSE seconds. Its owner only touches the connection through a live
        cursor (taken under self.lock), so it is not using it meanwhile."""
        with self.lock:
            if self.closed:
                return True
            if (len(self.cursors) or now - self.last_use < IDLE_CLOSE
                    or self.conn.in_transaction):
                return False
            self.closed = True
        with contextlib.suppress(Exception):
            self.conn.close()
        return True

    def __del__(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                self.conn.close()


class _Sweeper:
    """One daemon thread per process that closes idle connections of every thread."""

    def __init__(self) -> None:
        self.conns: weakref.WeakSet[_Conn] = weakref.WeakSet()
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None

    def track(self, c: _Conn) -> None:
        with self.cond:
            self.conns.add(c)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="db-idle", daemon=True)
                self.thread.start()
            self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.conns:
                    self.cond.wait()
            time.sleep(SWEEP_EVERY)
            self._sweep(time.monotonic())

    def _sweep(self, now: float) -> None:
        # its own frame: no strong reference to a _Conn outlives the sweep, so a thread
        # that ends meanwhile still has its connection closed by _Conn.__del__
        with self.cond:
            conns = list(self.conns)
        for c in conns:
            if c.close_if_idle(now):
                with self.cond:
                    self.conns.discard(c)

    def reset_after_fork(self) -> None:
        self.conns = weakref.WeakSet()
        self.cond = threading.Condition()
        self.thread = None


_sweeper = _Sweeper()
os.register_at_fork(after_in_child=_sweeper.reset_after_fork)


class NodeDatabase(peewee.SqliteDatabase):
    """peewee's SqliteDatabase (one connection per thread, opened on first use) whose
    connections close when their thread ends or when idle (see the module docstring)."""

    _state: Any  # peewee's thread-local connection state (not in its stubs)

    def _connect(self) -> sqlite3.Connection:
        conn: sqlite3.Connection = cast(Any, super())._connect()
        c = _Conn(conn)
        self._state.handle = c  # thread-local, like the connection itself
        _sweeper.track(c)
        return conn

    def _close(self, conn: sqlite3.Connection) -> None:
        c = getattr(self._state, "handle", None)
        if c is not None and c.conn is conn:
            with c.lock:
                c.closed = True
        cast(Any, super())._close(conn)

    def cursor(self, named_cursor: Any = None) -> sqlite3.Cursor:
        if self.is_closed():
            self.connect()  # peewee's autoconnect
        c: _Conn = self._state.handle
        with c.lock:
            if not c.closed:
                cur = c.conn.cursor()
                c.cursors.add(cur)
                c.last_use = time.monotonic()
                return cur
        # closed while idle: a fresh connection in place, keeping peewee's thread state
        # (an atomic() block may have pushed its transaction and not yet sent BEGIN)
        conn = self._connect()
        self._state.conn = conn
        cast(Any, self)._initialize_connection(conn)
        return self.cursor()


class WriterLock:
    """Write transactions on one database, in order: threads of this process queue on a
    lock, processes on an exclusive flock() of `<database>-writers.lock` (0600).

    Without it, a writer that finds the database locked by another process waits in
    SQLite's busy handler, which sleeps 1, 2, 5, 10 ms ... between tries and is not fair:
    with two workers and four senders of small objects nearly every instance slept there
    once, 3-4 ms on average (strace: 303 clock_nanosleep for ~300 instances per worker),
    and under 32 concurrent stores a writer could be starved past busy_timeout (issue 9).
    flock() wakes the next waiter as soon as the lock is dropped. Processes that do not
    take it (admin commands) still meet SQLite's own locking, so correctness never
    depends on this lock; when the lock file cannot be opened only the thread lock is used.
    """

    def __init__(self, database: str | Path) -> None:
        self.path = f"{database}-writers.lock"
        self._thread = threading.Lock()
        self._fd: int | None = None
        self._tried = False

    def _file(self) -> int | None:
        if not self._tried:
            self._tried = True
            with contextlib.suppress(OSError):
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return self._fd

    def __enter__(self) -> WriterLock:
        self._thread.acquire()
        try:
            fd = self._file()
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)  # releases the GIL while it waits
        except BaseException:
            self._thread.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread.release()

    def close(self) -> None:
        with self._thread:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def open_sqlite(path: str | Path, *, create: bool = True) -> peewee.SqliteDatabase:
    """Open (thread-local connections, see NodeDatabase) a SQLite database with our pragmas.

    Raises EnvironmentProblem when the file is missing and create is False, or unopenable.
    """
    p = Path(path)
    if not create and not p.exists():
        raise EnvironmentProblem(f"{p}: database does not exist (run `pacsd init`?)")
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not p.exists():
        fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
    db = NodeDatabase(str(p), pragmas=PRAGMAS, check_same_thread=False)
    try:
        db.connect(reuse_if_open=True)
    except peewee.OperationalError as exc:
        raise EnvironmentProblem(f"{p}: cannot open database: {exc}") from None
    return db


def migrate(db: peewee.SqliteDatabase, migrations: Sequence[Migration]) -> int:
    """Apply the migrations not yet applied, each in its own transaction; returns the version.

    migrations[i] brings the schema from version i to version i+1. Applied versions are
    kept in the table `schema_version`, so later releases change the schema without
    losing data. Raises EnvironmentProblem if the file is newer than this code.
    """
    db.execute_sql("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    with db.atomic("IMMEDIATE"):
        row = db.execute_sql("SELECT max(version) FROM schema_version").fetchone()
        current = int(row[0] or 0)
    if current > len(migrations):
        raise EnvironmentProblem(
            f"{db.database}: schema version {current} is newer than this pacsd knows "
            f"({len(migrations)}); upgrade pacsd"
        )
    for version in range(current, len(migrations)):
        with db.atomic("IMMEDIATE"):
            row = db.execute_sql("SELECT max(version) FROM schema_version").fetchone()
            if int(row[0] or 0) > version:  # another process migrated meanwhile
                continue
            migrations[version](db)
            db.execute_sql("INSERT INTO schema_version (version) VALUES (?)", (version + 1,))
    return len(migrations)
