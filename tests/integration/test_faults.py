"""Failing parts under a running node (issue 9, DESIGN §8): a disk that fills in the
middle of a large object, an index locked by another connection, a CA file replaced by
garbage under a reload. Each: a clear refusal, nothing half-written, nothing
acknowledged lost, and the node keeps serving once the fault is gone.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Client, Node, make_dataset, needs_dcmtk

pytestmark = needs_dcmtk


def store(node: Node, client: Client, files: list[Path], *args: str,
          timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return node.dcmtk("storescu", client, "-R", *args, files=files, timeout=timeout)


def index_rows(node: Node) -> set[str]:
    db = sqlite3.connect(node.dir / "data" / "index.sqlite", timeout=30)
    try:
        return {r[0] for r in db.execute("SELECT sop_instance_uid FROM instance")}
    finally:
        db.close()


def acknowledged(out: str) -> int:
    """Stores storescu reports as successful (DCMTK prints 'Received Store Response
    (Success)' with -v; without it, failures are the lines starting with E:)."""
    return len(re.findall(r"Received Store Response \(Success\)", out))


def published(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.dcm") if ".tmp" not in p.parts)


def verify_clean(node: Node) -> None:
    r = node.cli("verify", "--json")
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------ disk full


@pytest.fixture
def small_fs(tmp_path: Path) -> Any:
    """A 64 MiB tmpfs (root only); skipped where mounting is not permitted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_mid_object_is_a700_and_leaves_nothing(node_factory: Any, tmp_path: Path,
                                                       small_fs: Path) -> None:
    """A 200 MB object on a 64 MiB object file system: refused with A700 (the spool stops
    at the free-space allowance), no partial file. Then the disk really fills (another
    writer takes the space while a 40 MB object streams): A700 too, not an abort. Once
    space returns, the next small object is accepted."""
    objects = small_fs / "objects"
    node = node_factory(**{"storage.root": str(objects), "storage.min_free_mb": 4})
    c = node.add_client("MOD")
    big = make_dataset(tmp_path / "big.dcm", pixel_bytes=200 * 1024 * 1024)
    r = store(node, c, [big], "-v")
    out = r.stdout + r.stderr
    assert "Refused: OutOfResources" in out, out[-2000:]
    assert acknowledged(out) == 0
    assert published(objects) == []
    assert list((objects / ".tmp").iterdir()) == []

    # the disk fills while an object streams in: a filler takes the space mid-transfer
    mid = make_dataset(tmp_path / "mid.dcm", pixel_bytes=40 * 1024 * 1024)
    filler = small_fs / "filler"
    proc = subprocess.Popen(
        ["/usr/bin/storescu", *node.tls_args(c), "-R", "-v", "-aet", c.title, "-aec",
         node.ae_title, "127.0.0.1", str(node.port), str(mid)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "TCP_NODELAY": "1"})

    def spool_size() -> int:
        return sum(p.stat().st_size for p in (objects / ".tmp").glob("spool-*"))

    deadline = time.monotonic() + 30
    while spool_size() < 2 * 1024 * 1024 and time.monotonic() < deadline:
        time.sleep(0.01)
    st = os.statvfs(small_fs)
    with open(filler, "wb") as f:  # take everything that is left
        chunk = b"\0" * (1 << 20)
        try:
            for _ in range(st.f_bavail * st.f_frsize // len(chunk) + 1):
                f.write(chunk)
                f.flush()
        except OSError:
            pass
    out, _ = proc.communicate(timeout=120)
    assert "Refused: OutOfResources" in out, out[-2000:]
    assert acknowledged(out) == 0
    assert published(objects) == []
    assert list((objects / ".tmp").iterdir()) == []

    filler.unlink()  # space returns
    small = make_dataset(tmp_path / "small.dcm")
    r = store(node, c, [small], "-v")
    assert r.returncode == 0 and acknowledged(r.stdout + r.stderr) == 1, r.stdout + r.stderr
    assert len(published(objects)) == 1
    verify_clean(node)


# ------------------------------------------------------------------ index locked


def hold_write_lock(path: Path, seconds: float, ready: threading.Event) -> None:
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        ready.set()
        time.sleep(seconds)
        db.execute("ROLLBACK")
    finally:
        db.close()


def test_index_locked_stores_wait_or_fail_cleanly(node_factory: Any, tmp_path: Path) -> None:
    """Another connection holds a write transaction on the index (a backup tool, say):
    for 5 s the stores wait (busy_timeout 10 s) and succeed; for 13 s they fail with a
    failure status. Never Success without a row; no orphan file; verify clean after."""
    node = node_factory()
    c = node.add_client("MOD")
    index = node.dir / "data" / "index.sqlite"
    files = [make_dataset(tmp_path / f"a{i}.dcm", patient_id=f"A{i}") for i in range(3)]
    store(node, c, files[:1], "-v")  # the index exists and the worker has it open

    for hold, expect_ok in ((5.0, True), (13.0, False)):
        ready = threading.Event()
        t = threading.Thread(target=hold_write_lock, args=(index, hold, ready), daemon=True)
        t.start()
        assert ready.wait(10)
        batch = [make_dataset(tmp_path / f"h{int(hold)}-{i}.dcm", patient_id=f"H{i}")
                 for i in range(2)]
        t0 = time.monotonic()
        r = store(node, c, batch, "-v", timeout=120)
        took = time.monotonic() - t0
        out = r.stdout + r.stderr
        t.join(30)
        ok = acknowledged(out)
        rows = index_rows(node)
        uids = {str(__import__("pydicom").dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                for f in batch}
        if expect_ok:
            assert ok == 2 and uids <= rows, out[-2000:]
            assert took >= hold - 1
        else:
            assert ok < 2, f"stores reported Success while the index was locked: {out}"
            assert "Refused: OutOfResources" in out, out[-2000:]
        # every acknowledged instance has its row, every row its file
        acked = len(re.findall(r"Received Store Response \(Success\)", out))
        assert len(uids & rows) >= acked
        verify_clean(node)
    r = store(node, c, files[1:], "-v")
    assert acknowledged(r.stdout + r.stderr) == 2, r.stdout + r.stderr


# ------------------------------------------------------------------ CA replaced by garbage


def echo_with_ca(node: Node, c: Client, ca: Path) -> subprocess.CompletedProcess[str]:
    """echoscu trusting `ca` (the client's own copy: the node's file is garbage now)."""
    return subprocess.run(
        ["/usr/bin/echoscu", "+tls", str(c.key), str(c.cert), "+cf", str(ca), "-aet", c.title,
         "-aec", node.ae_title, "127.0.0.1", str(node.port)],
        capture_output=True, text=True, timeout=20, env={**os.environ, "TCP_NODELAY": "1"})


def garbage_ca_refused(node_factory: Any, tmp_path: Path) -> tuple[Node, Client, Path, bytes]:
    node = node_factory()
    c = node.add_client("MOD")
    ca = tmp_path / "client-trusts.pem"
    ca.write_bytes(node.ca.read_bytes())
    r = echo_with_ca(node, c, ca)
    assert r.returncode == 0, r.stderr
    good = node.ca.read_bytes()
    node.ca.write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    assert node.proc is not None
    os.kill(node.proc.pid, signal.SIGHUP)
    refused = node.audit.wait_for(lambda x: x.get("event") == "config.reload"
                                  and x.get("outcome") == 8, timeout=20)
    assert refused, node.log_text()[-2000:]
    return node, c, ca, good


def test_garbage_ca_under_reload_is_refused_and_old_context_stays(node_factory: Any,
                                                                   tmp_path: Path) -> None:
    """The CA file is overwritten with garbage and SIGHUP sent: the reload is refused and
    audited (config.reload, outcome 8); associations keep working with the old context."""
    node, c, ca, good = garbage_ca_refused(node_factory, tmp_path)
    for _ in range(3):
        r = echo_with_ca(node, c, ca)
        assert r.returncode == 0, r.stdout + r.stderr
    node.ca.write_bytes(good)


def test_worker_replaced_after_a_refused_reload_keeps_the_old_context(
        node_factory: Any, tmp_path: Path) -> None:
    node, c, ca, good = garbage_ca_refused(node_factory, tmp_path)
    assert node.proc is not None
    workers = [p for p in node.pids() if p != node.proc.pid]
    os.kill(workers[0], signal.SIGKILL)
    ok = False
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not ok:
        time.sleep(1)
        try:
            ok = echo_with_ca(node, c, ca).returncode == 0
        except subprocess.TimeoutExpired:
            break
    node.ca.write_bytes(good)
    assert ok, f"no echo after a worker was replaced under a garbage CA:\n{node.log_text()[-3000:]}"
