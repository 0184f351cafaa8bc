"""Pure helpers of the supervisor: watchdog interval, slot counting, watched files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pacsd import daemon


def test_watchdog_interval_is_half_of_watchdog_usec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert daemon.watchdog_interval() == daemon.WATCHDOG_INTERVAL
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert daemon.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert daemon.watchdog_interval() == daemon.WATCHDOG_INTERVAL


def test_slots_in_use_counts_locks_held_by_other_processes(tmp_path: Path) -> None:
    path = tmp_path / "slots"
    path.write_bytes(b"")
    assert daemon.slots_in_use(path, 32) == 0
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         f"fd = os.open({str(path)!r}, os.O_RDWR)\n"
         "for i in (0, 1, 2, 7, 31):\n"
         "    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, i)\n"
         "print('held', flush=True)\n"
         "sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert daemon.slots_in_use(path, 32) == 5
        assert daemon.slots_in_use(path, 8) == 4  # only the first 8 slots count
    finally:
        holder.communicate("", timeout=10)
    assert daemon.slots_in_use(path, 32) == 0
    assert daemon.slots_in_use(tmp_path / "absent", 32) == 0


def test_files_fingerprint_changes_with_content_only(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("one")
    b.write_text("two")
    first = daemon.files_fingerprint([str(a), str(b)])
    a.touch()  # a new mtime alone is not a change
    assert daemon.files_fingerprint([str(a), str(b)]) == first
    a.write_text("uno")
    assert daemon.files_fingerprint([str(a), str(b)]) != first
    b.unlink()
    assert daemon.files_fingerprint([str(a), str(b)]) != first
