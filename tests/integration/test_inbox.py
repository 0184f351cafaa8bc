"""The watched inbox: dropped Part 10 files are ingested like a C-STORE, or refused."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from pacsd.inbox import ignored_name, truncation
from tests.conftest import Node, make_dataset


def _wait(pred: Any, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def _indexed(n: Node) -> dict[str, str]:
    con = sqlite3.connect(n.dir / "data" / "index.sqlite")
    try:
        return dict(con.execute("SELECT sop_instance_uid, calling_ae FROM instance"))
    finally:
        con.close()


def test_inbox_ingests_refuses_and_waits_for_writers(node_factory: Any, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    n: Node = node_factory(**{"inbox.directory": str(inbox), "inbox.settle_seconds": 1,
                              "inbox.scan_interval": 1})
    done, failed = inbox / "done", inbox / "failed"
    assert _wait(lambda: done.is_dir() and failed.is_dir())

    staging = tmp_path / "staging"
    good = [make_dataset(staging / f"g{i}.dcm", patient_id=f"IN{i}") for i in range(3)]
    whole = make_dataset(staging / "t.dcm", pixel_bytes=20000).read_bytes()
    for p in good:
        p.rename(inbox / p.name)
    (inbox / "truncated.dcm").write_bytes(whole[: len(whole) * 6 // 10])
    (inbox / "notes.txt").write_text("this is not DICOM\n" * 20)
    (inbox / "link.dcm").symlink_to(staging / "t.dcm")

    assert _wait(lambda: all((done / p.name).exists() for p in good)), list(inbox.rglob("*"))
    assert _wait(lambda: (failed / "truncated.dcm.reason").exists())
    assert "truncated" in (failed / "truncated.dcm.reason").read_text()
    assert _wait(lambda: (failed / "notes.txt.reason").exists())
    assert "not a DICOM" in (failed / "notes.txt.reason").read_text()
    assert _wait(lambda: (failed / "link.dcm.reason").exists())
    assert "not a regular file" in (failed / "link.dcm.reason").read_text()
    assert (failed / "link.dcm").is_symlink()  # moved, never followed

    indexed = _indexed(n)
    from pydicom import dcmread

    for p in good:
        uid = dcmread(done / p.name, stop_before_pixels=True).SOPInstanceUID
        assert indexed.get(uid) == "INBOX"
    assert len(indexed) == 3
    recs = n.audit.wait_for(lambda r: r["event"] == "dicom.store" and r.get("calling_ae") ==
                            "INBOX" and r["outcome"] == 0)
    assert len(n.audit.wait_for(lambda r: r["event"] == "dicom.store" and
                                r.get("calling_ae") == "INBOX" and r["outcome"] == 0 and
                                r.get("file") == good[-1].name)) == 1
    assert recs[0]["instances"] == 1 and len(recs[0]["sha256"]) == 64
    refused = n.audit.wait_for(lambda r: r["event"] == "dicom.store" and
                               r.get("file") == "truncated.dcm")
    assert refused and refused[0]["outcome"] == 8

    # a writer that pauses longer than settle_seconds while the file is open is waited for
    slow = make_dataset(staging / "slow.dcm", pixel_bytes=50000).read_bytes()
    target = inbox / "slow.dcm"
    with open(target, "wb") as f:
        f.write(slow[:1000])
        f.flush()
        time.sleep(3.5)
        assert target.exists(), "taken while still open for writing"
        assert not (failed / "slow.dcm").exists()
        f.write(slow[1000:])
    assert _wait(lambda: (done / "slow.dcm").exists()), list(inbox.rglob("*"))
    assert (done / "slow.dcm").read_bytes() == slow

    # the rename convention: *.part is never taken; renamed, it is
    part = inbox / "renamed.dcm.part"
    part.write_bytes(make_dataset(staging / "r.dcm").read_bytes())
    time.sleep(3)
    assert part.exists()
    part.rename(inbox / "renamed.dcm")
    assert _wait(lambda: (done / "renamed.dcm").exists())

    # after a reload (workers replaced one at a time) the new worker's inbox takes over
    import signal

    assert n.proc is not None
    n.proc.send_signal(signal.SIGHUP)
    assert n.audit.wait_for(lambda r: r["event"] == "config.reload" and r["outcome"] == 0,
                            timeout=60)
    after = make_dataset(staging / "after.dcm")
    after.rename(inbox / "after.dcm")
    assert _wait(lambda: (done / "after.dcm").exists(), timeout=40), list(inbox.rglob("*"))

    # the same file again is a duplicate: kept in done/ under a new name, still one row
    (inbox / "g0.dcm").write_bytes((done / "g0.dcm").read_bytes())
    assert _wait(lambda: len(list(done.glob("g0.dcm*"))) == 2)
    assert len(_indexed(n)) == 6
    r = n.cli("verify")
    assert r.returncode == 0, r.stdout


def test_truncation_and_names(tmp_path: Path) -> None:
    whole = make_dataset(tmp_path / "a.dcm", pixel_bytes=8000)
    assert truncation(str(whole)) is None
    data = whole.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:-100])
    assert "truncated" in (truncation(str(cut)) or "")
    junk = tmp_path / "junk"
    junk.write_bytes(b"\0" * 10)
    assert truncation(str(junk))
    assert ignored_name(".hidden.dcm") and ignored_name("x.PART") and ignored_name("y.tmp")
    assert not ignored_name("z.dcm")
