"""dbutil.NodeDatabase: connections do not outlive their use (issue 9).

In WAL mode SQLite parks the descriptor of a connection closed while another connection of
the process still holds its read lock, until the last connection to the file closes. These
tests count the process's descriptors on the database file, as the worker's were counted.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pacsd import dbutil


def db_fds(path: Path) -> int:
    """Open descriptors of this process on the database file itself (not -wal/-shm)."""
    n = 0
    for fd in Path("/proc/self/fd").iterdir():
        try:
            if fd.readlink() == path:
                n += 1
        except OSError:
            continue
    return n


def wait_for(cond: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return bool(cond())


@pytest.fixture()
def fast_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dbutil, "IDLE_CLOSE", 0.3)
    monkeypatch.setattr(dbutil, "SWEEP_EVERY", 0.1)


@pytest.fixture()
def db(tmp_path: Path, fast_sweep: None) -> Any:
    d = dbutil.open_sqlite(tmp_path / "t.sqlite")
    d.execute_sql("CREATE TABLE t (x INTEGER)")
    yield d
    if not d.is_closed() and not d.in_transaction():
        d.close()


def burst(db: Any, n: int) -> None:
    """n threads, each with its own connection open at the same time, then ending."""
    barrier = threading.Barrier(n)

    def work() -> None:
        db.execute_sql("INSERT INTO t (x) VALUES (1)")
        barrier.wait(10)
        assert db.execute_sql("SELECT count(*) FROM t").fetchone()[0] >= 1

    ts = [threading.Thread(target=work) for _ in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def test_descriptors_return_to_baseline_after_a_burst_while_a_thread_keeps_its_connection(
        db: Any, tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    # this thread keeps using its connection (as a worker's accept thread or commitment
    # dispatcher does): before NodeDatabase, its read lock kept every parked descriptor
    assert db.execute_sql("SELECT count(*) FROM t").fetchone()[0] == 0
    burst(db, 16)
    assert db.execute_sql("SELECT count(*) FROM t").fetchone()[0] == 16
    assert db_fds(path) >= 1
    assert wait_for(lambda: db_fds(path) == 0), f"{db_fds(path)} descriptors left"
    # the idle-closed connection reopens on next use, transparently
    assert db.execute_sql("SELECT count(*) FROM t").fetchone()[0] == 16
    assert db_fds(path) == 1
    assert wait_for(lambda: db_fds(path) == 0)


def test_a_thread_connection_closes_when_the_thread_ends(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dbutil, "IDLE_CLOSE", 3600.0)  # only the thread's end closes it
    d = dbutil.open_sqlite(tmp_path / "t.sqlite")
    d.close()
    wal = Path(f"{tmp_path / 't.sqlite'}-wal")
    seen: list[bool] = []

    def work() -> None:
        d.execute_sql("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
        seen.append(db_fds(tmp_path / "t.sqlite") == 1)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == [True]
    assert db_fds(tmp_path / "t.sqlite") == 0  # at once, not at the next GC
    assert not wal.exists()  # the last connection checkpointed and removed the WAL


def test_an_open_transaction_or_live_cursor_is_never_closed_under_its_owner(db: Any) -> None:
    with db.atomic("IMMEDIATE"):
        db.execute_sql("INSERT INTO t (x) VALUES (1)")
        time.sleep(1.0)  # > IDLE_CLOSE, several sweeps
        db.execute_sql("INSERT INTO t (x) VALUES (2)")
    assert db.execute_sql("SELECT count(*) FROM t").fetchone()[0] == 2
    for i in range(200):
        db.execute_sql("INSERT INTO t (x) VALUES (?)", (i,))
    cur = db.execute_sql("SELECT x FROM t")
    first = cur.fetchone()
    time.sleep(1.0)
    rest = cur.fetchall()  # the cursor kept its connection open
    assert first is not None and len(rest) == 201


def test_atomic_after_an_idle_close_runs_on_a_fresh_connection(db: Any) -> None:
    db.execute_sql("SELECT 1")
    time.sleep(1.0)  # closed while idle
    with db.atomic():
        db.execute_sql("INSERT INTO t (x) VALUES (1)")
    with pytest.raises(RuntimeError), db.atomic():
        db.execute_sql("INSERT INTO t (x) VALUES (2)")
        raise RuntimeError("roll back")
    assert [r[0] for r in db.execute_sql("SELECT x FROM t")] == [1]
