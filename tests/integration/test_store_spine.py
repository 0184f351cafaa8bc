"""C-STORE end to end: DCMTK storescu +tls into the durable, checksummed, indexed store."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.conftest import Node, dcmtk_path, make_dataset, needs_dcmtk, stored_files

pytestmark = needs_dcmtk


def _storescu(node: Node, client: object, files: list[Path], *extra: str,
              timeout: float = 600) -> object:
    return node.dcmtk("storescu", client, *extra, files=files,  # type: ignore[arg-type]
                      timeout=timeout)


def _index(node: Node, sql: str, *args: object) -> list[tuple[object, ...]]:
    con = sqlite3.connect(node.dir / "data" / "index.sqlite")
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_store_multi_patient_set_then_resend_stores_nothing_new(node: Node, tmp_path: Path) -> None:
    mod = node.add_client("MOD1")
    src = tmp_path / "src"
    files: list[Path] = []
    for p in range(6):
        study = generate_uid()
        series = generate_uid()
        for i in range(50):
            files.append(make_dataset(src / f"p{p}_{i}.dcm", patient_id=f"PAT{p}",
                                      patient_name=f"DOE^P{p}", study_uid=study,
                                      series_uid=series, InstanceNumber=i + 1))
    for i in range(2):
        files.append(make_dataset(src / f"big{i}.dcm", patient_id="PATBIG",
                                  pixel_bytes=52 * 1024 * 1024, modality="MR"))
    r = _storescu(node, mod, files)
    assert r.returncode == 0, r.stderr  # type: ignore[attr-defined]

    stored = stored_files(node)
    assert len(stored) == len(files)
    by_uid = {}
    for f in stored:
        data = f.read_bytes()
        assert hashlib.sha256(data).hexdigest() == f.stem
        ds = pydicom.dcmread(f)
        by_uid[ds.SOPInstanceUID] = ds
    for f in files:
        sent = pydicom.dcmread(f)
        got = by_uid[sent.SOPInstanceUID]
        assert got == sent  # every element equal (dataset as received, not re-encoded)
        assert got.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
    assert _index(node, "SELECT count(*) FROM instance")[0][0] == len(files)
    assert _index(node, "SELECT count(*) FROM patient")[0][0] == 7
    rows = _index(node, "SELECT sha256, size, calling_ae, source_ip FROM instance")
    for sha, size, calling, ip in rows:
        assert (node.objects / sha[:2] / sha[2:4] / f"{sha}.dcm").stat().st_size == size
        assert calling == "MOD1" and ip == "127.0.0.1"

    r = _storescu(node, mod, files)
    assert r.returncode == 0, r.stderr  # type: ignore[attr-defined]
    assert len(stored_files(node)) == len(files)
    assert _index(node, "SELECT count(*) FROM instance")[0][0] == len(files)
    assert node.cli("verify").returncode == 0

    recs = node.audit.wait_for(lambda r: r.get("event") == "dicom.store")
    assert sum(r["instances"] for r in recs) == 2 * len(files)


@pytest.mark.slow
def test_resident_memory_stays_flat_for_500_mb_object(node: Node, tmp_path: Path) -> None:
    mod = node.add_client("MOD1")
    big = make_dataset(tmp_path / "huge.dcm", pixel_bytes=500 * 1024 * 1024)
    small = make_dataset(tmp_path / "small.dcm")
    assert _storescu(node, mod, [small]).returncode == 0  # type: ignore[attr-defined]
    worker = max(node.pids())  # the worker is started after the supervisor
    base = _rss_kb(worker)
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_kb(worker))
            time.sleep(0.05)

    t = threading.Thread(target=sample)
    t.start()
    try:
        r = _storescu(node, mod, [big], "--max-pdu", "131072")
    finally:
        done.set()
        t.join()
    assert r.returncode == 0, r.stderr  # type: ignore[attr-defined]
    growth_mb = (peak[0] - base) / 1024
    print(f"\nworker RSS: base {base / 1024:.1f} MB, peak {peak[0] / 1024:.1f} MB, "
          f"growth {growth_mb:.1f} MB while receiving a 500 MB object")
    assert growth_mb < 64, f"RSS grew by {growth_mb:.1f} MB"
    big.unlink()


def test_kill_9_mid_transfer_leaves_no_partial_object(node: Node, tmp_path: Path) -> None:
    mod = node.add_client("MOD1")
    big = make_dataset(tmp_path / "big.dcm", pixel_bytes=150 * 1024 * 1024)
    import subprocess

    cmd = [dcmtk_path("storescu"), *node.tls_args(mod), "-aet", "MOD1", "-aec", node.ae_title,
           "--max-pdu", "16384", "127.0.0.1", str(node.port), str(big)]
    sender = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp_dir = node.objects / ".tmp"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until the spool file is growing
        parts = list(tmp_dir.glob("*")) if tmp_dir.exists() else []
        if parts and any(p.stat().st_size > 10 * 1024 * 1024 for p in parts):
            break
        time.sleep(0.05)
    else:
        pytest.fail("transfer never started")
    node.kill()
    sender.wait(60)
    node.start()
    r = node.cli("verify")
    assert r.returncode == 0, r.stdout + r.stderr
    assert stored_files(node) == []
    assert _index(node, "SELECT count(*) FROM instance")[0][0] == 0
    assert not list(tmp_dir.glob("*"))
    r2 = _storescu(node, mod, [big])
    assert r2.returncode == 0, r2.stderr  # type: ignore[attr-defined]
    assert len(stored_files(node)) == 1
    assert node.cli("verify").returncode == 0


def test_flipped_byte_is_found_by_verify(node: Node, tmp_path: Path) -> None:
    mod = node.add_client("MOD1")
    f = make_dataset(tmp_path / "a.dcm")
    assert _storescu(node, mod, [f]).returncode == 0  # type: ignore[attr-defined]
    assert node.cli("verify").returncode == 0
    (stored,) = stored_files(node)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.chmod(0o600)
    stored.write_bytes(bytes(data))
    r = node.cli("verify")
    assert r.returncode == 1
    assert stored.stem in r.stdout + r.stderr


def _send_raw(node: Node, client: object, part10: Path) -> int:
    """Send a Part 10 file as-is with pynetdicom (its dataset bytes are not re-encoded)."""
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes, do not re-encode
    ds = pydicom.dcmread(part10, stop_before_pixels=True, force=True)
    ae = AE(ae_title=client.title)  # type: ignore[attr-defined]
    ae.add_requested_context(ds.file_meta.MediaStorageSOPClassUID,
                             ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title,
                         tls_args=(node.ssl_context(client), None))  # type: ignore[arg-type]
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(part10)
        return int(rsp.Status) if rsp else -1
    finally:
        assoc.release()


def _rewrite_meta(src: Path, dst: Path, **meta: str) -> Path:
    """Copy src with its file meta changed but the dataset bytes untouched."""
    from pydicom.filewriter import write_file_meta_info

    ds = pydicom.dcmread(src)
    for k, v in meta.items():
        setattr(ds.file_meta, k, v)
    raw = src.read_bytes()
    start = _dataset_offset(raw)
    with open(dst, "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(f, ds.file_meta, enforce_standard=False)
        f.write(raw[start:])
    return dst


def _dataset_offset(raw: bytes) -> int:
    import struct

    group_len = struct.unpack("<I", raw[140:144])[0]
    return 144 + group_len


def test_sop_instance_mismatch_is_refused_and_nothing_stored(node: Node, tmp_path: Path) -> None:
    mod = node.add_client("MOD1")
    f = make_dataset(tmp_path / "a.dcm")
    bad = _rewrite_meta(f, tmp_path / "bad.dcm", MediaStorageSOPInstanceUID=generate_uid())
    assert _send_raw(node, mod, bad) == 0xA900
    assert stored_files(node) == []


@pytest.mark.filterwarnings("ignore:.*VR UI:UserWarning")  # the bad UIDs are the point
@pytest.mark.parametrize("uid", ["1." + "2" * 63, "1.2.abc.4", "1.2..3"])
def test_invalid_uids_are_refused(node: Node, tmp_path: Path, uid: str) -> None:
    mod = node.add_client("MOD1")
    settings = pydicom.config.settings
    saved = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        f = make_dataset(tmp_path / "a.dcm", sop_uid=uid)
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = saved
    # DCMTK sends what the file holds (pynetdicom refuses to send a 65-character UID)
    r = _storescu(node, mod, [f], "-v")
    assert "Success" not in r.stdout + r.stderr  # type: ignore[attr-defined]
    assert stored_files(node) == []
    recs = node.audit.wait_for(lambda r: r.get("event") == "dicom.store" and r["outcome"] == 8)
    assert recs and recs[0]["instances"] == 1 and "UID" in recs[0]["reason"]
    assert node.cli("verify").returncode == 0


def test_unparsable_dataset_gets_failure_status(node: Node, tmp_path: Path) -> None:
    mod = node.add_client("MOD1")
    f = make_dataset(tmp_path / "a.dcm")
    raw = f.read_bytes()
    off = _dataset_offset(raw)
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(raw[:off] + b"\x08\x00\x18\x00UI\xff\xff" + os.urandom(4000))
    status = _send_raw(node, mod, garbage)
    assert status == 0xC000, hex(status)
    assert stored_files(node) == []
    assert _storescu(node, mod, [f]).returncode == 0  # type: ignore[attr-defined]


def test_min_free_space_refuses_with_a700_and_writes_nothing(node_factory: object,
                                                             tmp_path: Path) -> None:
    n: Node = node_factory(**{"storage.min_free_mb": 10_000_000})  # type: ignore[operator]
    mod = n.add_client("MOD1")
    f = make_dataset(tmp_path / "a.dcm")
    assert _send_raw(n, mod, f) == 0xA700
    assert stored_files(n) == []
    tmp = n.objects / ".tmp"
    assert not tmp.exists() or not list(tmp.iterdir())


def test_store_without_permission_is_refused_association_stays(node: Node, tmp_path: Path) -> None:
    echo_only = node.add_client("ECHOONLY", permits="echo")
    f = make_dataset(tmp_path / "a.dcm")
    assert _send_raw(node, echo_only, f) == 0x0124
    assert stored_files(node) == []
