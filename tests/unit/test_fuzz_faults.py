"""Fault injection without a socket (issue 9): the object file system fills while a
spool file is being written."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from pacsd import config as configmod
from pacsd.store.ingest import OUT_OF_RESOURCES, Origin, Store
from pacsd.store.objects import SpoolFile


def test_spool_turns_enospc_into_over_limit(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    sp = SpoolFile(tmp_path)
    sp.write(b"x" * 1000)
    real = os.writev

    def full(fd: int, bufs: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", full)
    sp.write(b"y" * (4 << 20))  # beyond the buffer: goes to disk, which is full
    monkeypatch.setattr(os, "writev", real)
    assert sp.over_limit and sp.disk_full
    sp.write(b"z" * 10)  # later data is only counted
    assert sp.size == 1000 + (4 << 20) + 10
    assert Path(sp.name).stat().st_size == 0
    sp.abort()
    assert not Path(sp.name).exists()


def test_spool_other_write_errors_still_raise(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    sp = SpoolFile(tmp_path)

    def broken(fd: int, bufs: Any) -> int:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "writev", broken)
    with pytest.raises(OSError):
        sp.write(b"y" * (4 << 20))
    monkeypatch.undo()
    sp.abort()


def test_ingest_of_a_disk_full_spool_is_a700_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "pacsd.toml"
    p.write_text("[storage]\nmin_free_mb = 0\n")
    store = Store.open(configmod.load(p))
    try:
        sp = store.spool()

        def full(fd: int, bufs: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "writev", full)
        sp.write(b"\0" * (4 << 20))
        monkeypatch.undo()
        r = store.ingest(sp, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                         sop_instance_uid="1.2.3.4", transfer_syntax="1.2.840.10008.1.2.1",
                         origin=Origin(calling_ae="M", source_ip="127.0.0.1", username="",
                                       assoc_id="a" * 32))
        assert r.status == OUT_OF_RESOURCES and "full" in r.message
        assert list(store.objects.tmp.iterdir()) == []
    finally:
        store.close()
