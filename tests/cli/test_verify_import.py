"""`pacsd import` and `pacsd verify` as a sysadmin runs them (subprocess, exit codes, output)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.unit.test_store_ingest import make_dataset

ROOT = Path(__file__).parents[2]


def pacsd(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pacsd", "--config", str(cfg), *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)


@pytest.fixture
def node(tmp_path: Path) -> Path:
    cfg = tmp_path / "node" / "pacsd.toml"
    cfg.parent.mkdir()
    cfg.write_text('[storage]\nroot = "data/objects"\nindex = "data/index.sqlite"\n'
                   "min_free_mb = 0\n")
    return cfg


def write_part10(path: Path, **kw: str) -> None:
    ds = make_dataset(**kw)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def index_rows(cfg: Path) -> list[tuple[str, str, str, str]]:
    with sqlite3.connect(cfg.parent / "data" / "index.sqlite") as db:
        return db.execute("SELECT sop_instance_uid, sha256, calling_ae, source_ip "
                          "FROM instance").fetchall()


def test_import_directory_then_verify(node: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    study = generate_uid()
    write_part10(src / "a" / "1.dcm", study_uid=study)
    write_part10(src / "a" / "2.dcm", study_uid=study)
    write_part10(src / "b" / "deep" / "3.dcm", patient_id="P2")
    (src / "b" / "notes.txt").write_text("not dicom")

    out = pacsd(node, "import", str(src))
    assert out.returncode == 1, out.stderr
    assert f"failed: {src / 'b' / 'notes.txt'}: not a DICOM Part 10 file" in out.stdout
    assert "imported 4 files: 3 stored, 0 duplicate, 1 failed" in out.stdout
    rows = index_rows(node)
    assert len(rows) == 3
    assert {(r[2], r[3]) for r in rows} == {("IMPORT", "local")}
    objects = node.parent / "data" / "objects"
    for _uid, sha, _ae, _ip in rows:
        assert (objects / sha[:2] / sha[2:4] / f"{sha}.dcm").is_file()

    (src / "b" / "notes.txt").unlink()
    again = pacsd(node, "import", str(src / "a"), str(src / "b" / "deep" / "3.dcm"))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "imported 3 files: 0 stored, 3 duplicate, 0 failed" in again.stdout

    clean = pacsd(node, "verify")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "verified 3 objects" in clean.stdout and "0 corrupt, 0 missing, 0 orphan" in \
        clean.stdout

    sha = rows[0][1]
    victim = objects / sha[:2] / sha[2:4] / f"{sha}.dcm"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    bad = pacsd(node, "verify")
    assert bad.returncode == 1
    assert f"corrupt: {victim}" in bad.stdout
    assert rows[0][0] in bad.stdout
    assert "1 corrupt" in bad.stdout

    as_json = pacsd(node, "verify", "--json")
    assert as_json.returncode == 1
    report = json.loads(as_json.stdout)
    assert report["ok"] is False and report["corrupt"] == 1 and report["checked"] == 3
    assert report["problems"][0]["path"] == str(victim)


def test_import_missing_path_fails_naming_it(node: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.dcm"
    out = pacsd(node, "import", str(missing))
    assert out.returncode == 1
    assert f"failed: {missing}: cannot read" in out.stdout
    assert "Traceback" not in out.stderr


def test_verify_reports_orphan_and_missing(node: Path, tmp_path: Path) -> None:
    write_part10(tmp_path / "src" / "1.dcm")
    write_part10(tmp_path / "src" / "2.dcm")
    assert pacsd(node, "import", str(tmp_path / "src")).returncode == 0
    rows = index_rows(node)
    objects = node.parent / "data" / "objects"
    gone = objects / rows[0][1][:2] / rows[0][1][2:4] / f"{rows[0][1]}.dcm"
    gone.unlink()
    with sqlite3.connect(node.parent / "data" / "index.sqlite") as db:
        db.execute("DELETE FROM instance WHERE sop_instance_uid = ?", (rows[1][0],))
    out = pacsd(node, "verify")
    assert out.returncode == 1
    assert f"missing: {gone} (SOP Instance UID {rows[0][0]})" in out.stdout
    assert f"orphan: {objects / rows[1][1][:2] / rows[1][1][2:4] / (rows[1][1] + '.dcm')}" \
        in out.stdout
    assert "0 corrupt, 1 missing, 1 orphan" in out.stdout


def test_verify_without_an_index_is_an_environment_error(node: Path) -> None:
    out = pacsd(node, "verify")
    assert out.returncode == 2
    assert "index.sqlite" in out.stderr and "does not exist" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (node.parent / "data" / "index.sqlite").exists()
