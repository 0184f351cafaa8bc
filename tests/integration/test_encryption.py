"""Encryption at rest (issue 7) end to end: the real daemon with `[storage] encryption`,
storescu +tls in, pynetdicom C-MOVE (to a real storescp +tls) and C-GET out, `verify`,
key rotation and rewrap while storing, kill -9 during rewrap and encrypt-existing."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.conftest import Node, make_dataset, needs_dcmtk, pacsd_cmd, stored_files
from tests.integration.test_qr import QRNode, StoreSCP, cget, cmove, ident

pytestmark = needs_dcmtk

STUDY1 = "1.2.826.0.1.3680043.9.7.1"


def assert_all_encrypted(node: Node, names: list[str]) -> None:
    files = stored_files(node)
    assert files
    for f in files:
        raw = f.read_bytes()
        assert raw[:8] == b"PACSDENV", f
        assert raw[128:132] != b"DICM", f
        for name in names:
            assert name.encode() not in raw, (f, name)
        assert hashlib.sha256(raw).hexdigest() != f.stem  # named by the plaintext


@pytest.fixture
def enc_qr(node_factory: Any, tmp_path: Path) -> QRNode:
    return QRNode(node_factory(**{"storage.encryption": True}), tmp_path)


def test_encrypted_store_move_get_round_trip(enc_qr: QRNode, tmp_path: Path) -> None:
    node = enc_qr.node
    assert_all_encrypted(node, ["DOE^JANE", "SMITH^JANE", "DOEL^JANE"])
    assert len(stored_files(node)) == len(enc_qr.files)
    r = node.cli("verify")
    assert r.returncode == 0, r.stdout + r.stderr
    sent = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in enc_qr.files}

    scp = StoreSCP(enc_qr, tmp_path / "dest")
    a = enc_qr.assoc()
    try:
        _, final = cmove(a, ident("STUDY", StudyInstanceUID=STUDY1))
        assert final.Status == 0 and final.NumberOfCompletedSuboperations == 2
    finally:
        a.release()
        scp.close()
    got = [pydicom.dcmread(f) for f in scp.files()]
    assert len(got) == 2
    for ds in got:
        assert ds == sent[ds.SOPInstanceUID]

    _, final, _, received = cget(enc_qr, ident("STUDY", StudyInstanceUID=STUDY1))
    assert final.Status == 0 and len(received) == 2
    for ds in received:
        assert ds == sent[ds.SOPInstanceUID]
    # decrypted copies for sending never stay behind
    assert list((node.objects / ".tmp").iterdir()) == []


def test_flipped_byte_is_found_and_never_sent(enc_qr: QRNode) -> None:
    node = enc_qr.node
    victim_uid = f"{STUDY1}.1.2"
    r = node.cli("key", "list")
    assert r.returncode == 0 and "objects 8" in r.stdout, r.stdout + r.stderr
    # find the victim's file through the index (its bytes are ciphertext)
    import sqlite3

    with sqlite3.connect(node.dir / "data" / "index.sqlite") as db:
        (sha,) = db.execute("SELECT sha256 FROM instance WHERE sop_instance_uid = ?",
                            (victim_uid,)).fetchone()
    victim = node.objects / sha[:2] / sha[2:4] / f"{sha}.dcm"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(bytes(raw))

    r = node.cli("verify")
    assert r.returncode == 1
    assert f"corrupt: {victim}" in r.stdout and "authenticate" in r.stdout, r.stdout

    _, final, identifier, received = cget(enc_qr, ident("STUDY", StudyInstanceUID=STUDY1))
    assert [d.SOPInstanceUID for d in received] == [f"{STUDY1}.1.1"]
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (1, 1)
    assert identifier is not None and identifier.FailedSOPInstanceUIDList == victim_uid
    rec = node.audit.wait_for(lambda r: r.get("event") == "integrity.failure")
    assert rec and rec[0]["sop_instance_uid"] == victim_uid


def _one_line_exit_2(r: subprocess.CompletedProcess[str], needle: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_missing_or_wrong_key_refuses_check_config_and_serve(node_factory: Any) -> None:
    node: Node = node_factory(start=False, **{"storage.encryption": True})
    key = node.dir / "tls" / "storage.key"
    ring = node.dir / "data" / "keyring.json"
    saved = key.read_bytes()
    key.unlink()
    _one_line_exit_2(node.cli("check-config"), "storage key file not found")
    _one_line_exit_2(node.cli("serve", timeout=60), "storage key file not found")
    assert not ring.exists() and stored_files(node) == []  # nothing written

    key.write_bytes(saved)
    key.chmod(0o644)
    _one_line_exit_2(node.cli("check-config"), "0600")
    key.chmod(0o600)
    node.start()  # creates the keyring under the right key
    node.stop()
    assert ring.exists()
    before = ring.read_bytes()
    key.write_bytes(hashlib.sha256(saved).digest())  # 32 bytes, but another key
    _one_line_exit_2(node.cli("check-config"), "not the key that wraps")
    _one_line_exit_2(node.cli("serve", timeout=60), "not the key that wraps")
    assert ring.read_bytes() == before


def _storescu(node: Node, client: Any, files: list[Path]) -> subprocess.CompletedProcess[str]:
    return node.dcmtk("storescu", client, files=files)


def test_rotation_and_rewrap_while_storing(node_factory: Any, tmp_path: Path) -> None:
    node: Node = node_factory(**{"storage.encryption": True})
    mod = node.add_client("MOD")
    first = [make_dataset(tmp_path / "a" / f"{i}.dcm", patient_id=f"A{i}",
                          pixel_bytes=200_000) for i in range(12)]
    assert _storescu(node, mod, first).returncode == 0
    r = node.cli("key", "rotate")
    assert r.returncode == 0, r.stderr
    later = [make_dataset(tmp_path / "b" / f"{i}.dcm", patient_id=f"B{i}",
                          pixel_bytes=200_000) for i in range(12)]
    results: list[subprocess.CompletedProcess[str]] = []
    t = threading.Thread(target=lambda: results.append(_storescu(node, mod, later)))
    t.start()
    r = node.cli("key", "rewrap", "--rate", "2")  # slow enough to overlap the stores
    t.join(120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert results and results[0].returncode == 0, results[0].stderr if results else ""
    r = node.cli("key", "rewrap")  # anything stored with v1 during the overlap
    assert r.returncode == 0, r.stdout + r.stderr
    r = node.cli("key", "list")
    assert "* version 2" in r.stdout and "objects 24" in r.stdout, r.stdout
    r = node.cli("verify")
    assert r.returncode == 0 and "verified 24 objects" in r.stdout, r.stdout
    # the running daemon reads what rewrap wrote, then retiring version 1 is safe
    r = node.cli("key", "rewrap", "--retire")
    assert r.returncode == 0 and "retired key versions 1" in r.stdout, r.stdout
    assert _storescu(node, mod, first[:1]).returncode == 0
    rewrap = node.audit.wait_for(lambda r: r.get("event") == "key.rewrap"
                                 and r.get("phase") == "rewrap.complete")
    rotate = node.audit.wait_for(lambda r: r.get("event") == "key.rotate")
    assert rewrap and rotate and rotate[0]["version"] == 2


def _versions(node: Node) -> list[int | None]:
    out: list[int | None] = []
    for f in stored_files(node):
        head = f.read_bytes()[:16]
        out.append(int.from_bytes(head[12:16], "big") if head[:8] == b"PACSDENV" else None)
    return out


def _kill_midway(node: Node, *args: str, version: int) -> None:
    """Run a conversion and SIGKILL it once a few objects (not all) are at `version`."""
    proc = subprocess.Popen(pacsd_cmd("--config", str(node.cfg_path), *args),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while _versions(node).count(version) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    done = _versions(node).count(version)
    assert 0 < done < len(stored_files(node))  # really midway


def _verify_json(node: Node) -> dict[str, Any]:
    r = node.cli("verify", "--json")
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def test_kill_9_during_encrypt_existing_and_rewrap(node_factory: Any, tmp_path: Path) -> None:
    node: Node = node_factory(start=False)
    files = [make_dataset(tmp_path / "in" / f"{i}.dcm", patient_id=f"K{i}",
                          patient_name="KILL^NINE", pixel_bytes=250_000) for i in range(24)]
    r = node.cli("import", *map(str, files))
    assert r.returncode == 0, r.stderr
    node.set_config("storage", "encryption", True)

    _kill_midway(node, "key", "encrypt-existing", "--rate", "0.5", version=1)
    report = _verify_json(node)
    # every object readable and verifiable; at most the killed run's temp file is left
    assert report["corrupt"] == 0 and report["missing"] == 0, report
    assert all(".tmp" in p["path"] for p in report["problems"]), report
    r = node.cli("key", "encrypt-existing", "--rate", "0")  # resumes
    assert r.returncode == 0, r.stdout + r.stderr
    assert _verify_json(node)["ok"]
    assert_all_encrypted(node, ["KILL^NINE"])
    assert node.audit.wait_for(lambda r: r.get("event") == "key.create")
    assert node.audit.wait_for(lambda r: r.get("phase") == "encrypt-existing.complete")

    assert node.cli("key", "rotate").returncode == 0
    _kill_midway(node, "key", "rewrap", "--rate", "0.5", version=2)
    report = _verify_json(node)
    assert report["corrupt"] == 0 and report["missing"] == 0, report
    node.start()  # a restart sweeps the killed run's temp file
    assert _verify_json(node)["ok"]
    r = node.cli("key", "rewrap", "--rate", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "objects 24" in node.cli("key", "list").stdout
    assert _verify_json(node)["ok"]


def test_encrypted_backup_restore_with_and_without_key(node_factory: Any, tmp_path: Path) -> None:
    node: Node = node_factory(start=False)  # a plaintext store: --encrypt seals everything
    files = [make_dataset(tmp_path / "in" / f"{i}.dcm", patient_id=f"BK{i}",
                          patient_name="BACKUP^PATIENT", pixel_bytes=70_000) for i in range(6)]
    assert node.cli("import", *map(str, files[:3])).returncode == 0
    node.set_config("storage", "encryption", True)
    assert node.cli("import", *map(str, files[3:])).returncode == 0  # 3 plain + 3 envelopes
    dest = tmp_path / "backup"
    r = node.cli("backup", "--encrypt", str(dest))
    assert r.returncode == 0, r.stdout + r.stderr
    for f in [dest / "index.sqlite", dest / "users.sqlite", *dest.rglob("*.dcm")]:
        raw = f.read_bytes()
        assert raw[:8] == b"PACSDENV", f
        assert b"BACKUP^PATIENT" not in raw and b"SQLite format" not in raw, f
    assert json.loads((dest / "backup.json").read_text())["encrypted"] is True
    assert subprocess.run(["sha256sum", "-c", "--quiet", "manifest.sha256"], cwd=dest,
                          capture_output=True).returncode == 0

    other: Node = node_factory(start=False)  # a new node: its own (different) storage key
    for p in (other.dir / "data" / "index.sqlite", other.dir / "data" / "users.sqlite"):
        p.unlink(missing_ok=True)
    r = other.cli("restore", str(dest))
    _one_line_exit_2(r, "encrypted backup")
    assert stored_files(other) == []  # nothing written
    key = other.dir / "tls" / "storage.key"
    key.write_bytes((node.dir / "tls" / "storage.key").read_bytes())
    r = other.cli("restore", str(dest))
    assert r.returncode == 0, r.stdout + r.stderr
    r = other.cli("verify")
    assert r.returncode == 0 and "verified 6 objects" in r.stdout, r.stdout + r.stderr
    assert "objects 6" in other.cli("key", "list").stdout
