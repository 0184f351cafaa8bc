"""dbutil.WriterLock: index writers of several processes queue on flock(), not in SQLite's
sleeping busy handler."""

from __future__ import annotations

import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

from pacsd.dbutil import WriterLock

_HOLD = """
import sys, time
from pacsd.dbutil import WriterLock
lock = WriterLock(sys.argv[1])
with lock:
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_another_process_holding_the_lock_makes_a_writer_wait_until_it_lets_go(
        tmp_path: Path) -> None:
    db = tmp_path / "index.sqlite"
    other = subprocess.Popen([sys.executable, "-c", _HOLD, str(db)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None and other.stdin is not None
        assert other.stdout.readline().strip() == "held"
        lock = WriterLock(db)
        got = threading.Event()

        def take() -> None:
            with lock:
                got.set()

        t = threading.Thread(target=take)
        t.start()
        assert not got.wait(0.3)  # blocked by the other process
        other.stdin.write("\n")
        other.stdin.flush()
        assert got.wait(10)
        t.join(10)
        lock.close()
    finally:
        other.kill()
        other.wait(10)
    mode = Path(f"{db}-writers.lock").stat().st_mode
    assert stat.S_IMODE(mode) == 0o600


def test_threads_of_one_process_exclude_each_other(tmp_path: Path) -> None:
    lock = WriterLock(tmp_path / "index.sqlite")
    inside, overlaps = [0], [0]

    def work() -> None:
        for _ in range(50):
            with lock:
                inside[0] += 1
                if inside[0] > 1:
                    overlaps[0] += 1
                time.sleep(0.0002)
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps[0] == 0
    lock.close()


def test_without_a_lock_file_only_the_thread_lock_is_used(tmp_path: Path) -> None:
    lock = WriterLock(tmp_path / "missing-dir" / "index.sqlite")  # cannot be created
    with lock:
        pass
    assert not (tmp_path / "missing-dir").exists()
