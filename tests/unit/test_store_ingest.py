"""Store.ingest: durable, validated, indexed; failures leave neither file nor row."""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import sys
import textwrap
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from pacsd import config as configmod
from pacsd.store import filemeta, ingest, objects
from pacsd.store.index import Instance, Patient, Series, Study
from pacsd.store.ingest import (
    CANNOT_UNDERSTAND,
    DATASET_MISMATCH,
    DUPLICATE_REJECTED,
    OUT_OF_RESOURCES,
    SUCCESS,
    IngestResult,
    Origin,
    Store,
)

ORIGIN = Origin(calling_ae="MODALITY1", source_ip="127.0.0.1", username="tech",
                assoc_id="a" * 32)


# --------------------------------------------------------------------------- builders


def make_dataset(*, patient_id: str = "P1", patient_name: str = "Doe^Jane",
                 study_uid: str | None = None, series_uid: str | None = None,
                 sop_uid: str | None = None, modality: str = "CT",
                 sop_class: str = CTImageStorage, pixels: int = 64,
                 charset: str | None = None) -> Dataset:
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyDate = "20240315"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC1"
    ds.Modality = modality
    ds.ReferringPhysicianName = "Welby^Marcus"
    ds.StudyDescription = "CHEST"
    ds.SeriesDescription = f"{modality} series"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyID = "S1"
    ds.SeriesNumber = 2
    ds.InstanceNumber = 5
    ds.Rows = 1
    ds.Columns = min(pixels // 2, 512)
    ds.BitsAllocated = 16
    ds.PixelData = os.urandom(pixels)
    return ds


def encode(ds: Dataset, ts: str = ExplicitVRLittleEndian) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = ts == ImplicitVRLittleEndian
    write_dataset(buf, ds)
    return buf.getvalue()


def part10(ds: Dataset, ts: str = ExplicitVRLittleEndian, *, sop_class: str | None = None,
           sop_uid: str | None = None) -> bytes:
    return filemeta.file_meta_bytes(sop_class or ds.SOPClassUID, sop_uid or ds.SOPInstanceUID,
                                    ts) + encode(ds, ts)


def put(store: Store, ds: Dataset, *, data: bytes | None = None, sop_class: str | None = None,
        sop_uid: str | None = None, ts: str = ExplicitVRLittleEndian) -> IngestResult:
    """Ingest `ds` as a C-STORE would: request UIDs default to the dataset's."""
    sop_class = sop_class or str(ds.SOPClassUID)
    sop_uid = sop_uid or str(ds.SOPInstanceUID)
    sp = store.spool()
    sp.write(data if data is not None else part10(ds, ts, sop_class=sop_class, sop_uid=sop_uid))
    return store.ingest(sp, sop_class_uid=sop_class, sop_instance_uid=sop_uid,
                        transfer_syntax=ts, origin=ORIGIN)


def write_config(tmp_path: Path, extra: str = "") -> configmod.Config:
    p = tmp_path / "pacsd.toml"
    base = "" if "min_free_mb" in extra else "min_free_mb = 0\n"
    p.write_text(f"[storage]\n{base}{extra}\n")
    return configmod.load(p)


def object_files(store: Store) -> list[Path]:
    return [p for p, _ in store.objects.walk()]


def assert_nothing_stored(store: Store) -> None:
    assert object_files(store) == []
    assert list(store.objects.tmp.iterdir()) == []
    assert Instance.select().count() == 0


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = Store.open(write_config(tmp_path))
    yield s
    s.close()


def open_store(tmp_path: Path, extra: str) -> Store:
    return Store.open(write_config(tmp_path, extra))


# --------------------------------------------------------------------------- success path


def test_stores_file_named_by_sha256_and_indexes_it(store: Store) -> None:
    ds = make_dataset()
    data = part10(ds)
    r = put(store, ds, data=data)
    assert (r.status, r.stored, r.duplicate) == (SUCCESS, True, False)
    assert r.size == len(data)
    path = store.objects.path_for(r.sha256)
    assert path.read_bytes() == data  # exact bytes, never re-encoded
    assert objects.hash_file(path) == r.sha256
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert list(store.objects.tmp.iterdir()) == []
    row = Instance.get(Instance.sop_instance_uid == ds.SOPInstanceUID)
    assert (row.sha256, row.size, row.transfer_syntax) == (r.sha256, len(data),
                                                          ExplicitVRLittleEndian)
    assert (row.calling_ae, row.source_ip, row.username, row.assoc_id) == (
        "MODALITY1", "127.0.0.1", "tech", "a" * 32)
    assert row.instance_number == 5
    assert datetime.fromisoformat(row.received).utcoffset().total_seconds() == 0
    se = row.series
    assert (se.modality, se.series_number, se.series_description) == ("CT", 2, "CT series")
    st = se.study
    assert (st.study_date, st.study_time, st.accession_number, st.study_id) == (
        "20240315", "101500", "ACC1", "S1")
    assert (st.referring_physician_name, st.referring_physician_name_upper) == (
        "Welby^Marcus", "WELBY^MARCUS")
    pt = st.patient
    assert (pt.patient_id, pt.patient_name, pt.patient_birth_date, pt.patient_sex) == (
        "P1", "Doe^Jane", "19700101", "F")
    # what the store hands back parses to the dataset that was sent
    assert pydicom.dcmread(store.verified_path(r.sha256)) == ds


def test_multi_patient_hierarchy_and_modalities_in_study(store: Store) -> None:
    study_a, study_b = generate_uid(), generate_uid()
    ct_series, mr_series = generate_uid(), generate_uid()
    for _ in range(3):
        assert put(store, make_dataset(study_uid=study_a, series_uid=ct_series)).ok
    assert put(store, make_dataset(study_uid=study_a, series_uid=mr_series, modality="MR",
                                   sop_class=MRImageStorage)).ok
    assert put(store, make_dataset(patient_id="P2", patient_name="Roe^Rick",
                                   study_uid=study_b)).ok
    assert Patient.select().count() == 2
    assert Study.select().count() == 2
    assert Series.select().count() == 3
    assert Instance.select().count() == 5
    a = Study.get(Study.study_instance_uid == study_a)
    assert a.modalities_in_study == "CT\\MR"
    assert a.patient.patient_id == "P1"
    assert Study.get(Study.study_instance_uid == study_b).patient.patient_name == "Roe^Rick"


def test_patients_without_id_are_not_merged(store: Store) -> None:
    assert put(store, make_dataset(patient_id="", patient_name="Anon^A")).ok
    assert put(store, make_dataset(patient_id="", patient_name="Anon^B")).ok
    assert put(store, make_dataset(patient_id="", patient_name="Anon^A")).ok
    assert put(store, make_dataset(patient_id="P9", patient_name="Old^Name")).ok
    assert put(store, make_dataset(patient_id="P9", patient_name="New^Name")).ok
    names = sorted(p.patient_name for p in Patient.select())
    assert names == ["Anon^A", "Anon^B", "New^Name"]  # one P9, latest name wins


@pytest.mark.parametrize(("charset", "name"), [
    ("ISO_IR 100", "Müller^Hans"),
    ("ISO_IR 192", "Łukasz^Żółć"),
])
def test_names_decoded_per_charset_with_upper_twin(store: Store, charset: str,
                                                    name: str) -> None:
    ds = make_dataset(patient_name=name, charset=charset)
    assert put(store, ds).ok
    pt = Patient.get()
    assert pt.patient_name == name
    assert pt.patient_name_upper == name.upper()
    assert pt.specific_charset == charset
    assert Study.get().specific_charset == charset


def test_implicit_vr_and_large_header_fall_back_to_file(store: Store) -> None:
    ds = make_dataset()
    ds.add_new(0x00090010, "LO", "BIGVENDOR")
    ds.add_new(0x00091001, "OB", os.urandom(objects.HEAD_SIZE + 1000))  # before group 0x20
    r = put(store, ds, ts=ImplicitVRLittleEndian)
    assert r.ok, r.message
    assert Series.get().series_instance_uid == ds.SeriesInstanceUID


# --------------------------------------------------------------------------- duplicates


def test_duplicate_keep_stores_nothing_new(store: Store) -> None:
    ds = make_dataset()
    first = put(store, ds)
    ds.StudyDescription = "CHANGED"  # same UID, other bytes
    again = put(store, ds)
    assert (again.status, again.stored, again.duplicate) == (SUCCESS, False, True)
    assert again.sha256 == first.sha256
    assert object_files(store) == [store.objects.path_for(first.sha256)]
    assert Instance.get().sha256 == first.sha256
    assert list(store.objects.tmp.iterdir()) == []


def test_duplicate_replace_points_to_new_object_and_removes_old(tmp_path: Path) -> None:
    store = open_store(tmp_path, 'on_duplicate = "replace"')
    ds = make_dataset()
    first = put(store, ds)
    ds.StudyDescription = "CHANGED"
    second = put(store, ds)
    assert (second.status, second.stored, second.duplicate) == (SUCCESS, True, True)
    assert second.sha256 != first.sha256
    assert object_files(store) == [store.objects.path_for(second.sha256)]
    assert Instance.select().count() == 1
    assert Instance.get().sha256 == second.sha256
    assert Study.get().study_description == "CHANGED"
    third = put(store, ds)  # identical bytes: replaced by itself, still there
    assert third.sha256 == second.sha256
    assert object_files(store) == [store.objects.path_for(second.sha256)]
    store.close()


def test_crash_during_replace_leaves_no_orphan_after_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_config(tmp_path, 'on_duplicate = "replace"')
    store = Store.open(cfg)
    ds = make_dataset()
    first = put(store, ds)
    ds.StudyDescription = "CHANGED"

    class Died(BaseException):
        pass

    def die(_sha: str) -> None:  # the process dies after the commit, before the removal
        raise Died

    monkeypatch.setattr(store, "_discard_if_unreferenced", die)
    with store.objects.removal_marker(first.sha256):  # what the marker is while it lives
        assert store.objects.path_for(first.sha256).stat().st_nlink == 2
        assert list(store.objects.temp_leftovers()) == []  # locked: not a leftover
    assert store.objects.path_for(first.sha256).stat().st_nlink == 1

    def marker_of_a_dead_process(sha: str) -> Any:  # the link stays, its lock died
        os.link(store.objects.path_for(sha), store.objects.tmp / "replaced-dead.tmp")
        return contextlib.nullcontext()

    monkeypatch.setattr(store.objects, "removal_marker", marker_of_a_dead_process)
    monkeypatch.setattr(objects.SpoolFile, "abort", objects.SpoolFile.close)
    with pytest.raises(Died):
        put(store, ds)
    monkeypatch.undo()
    second_sha = Instance.get().sha256
    assert second_sha != first.sha256
    assert store.objects.path_for(first.sha256).exists()  # the would-be orphan
    store.close()
    reopened = Store.open(cfg)  # the sweep finishes the job
    assert reopened.swept == 2  # the marker and the spool's temp name
    assert object_files(reopened) == [reopened.objects.path_for(second_sha)]
    assert list(reopened.objects.tmp.iterdir()) == []
    reopened.close()


def test_duplicate_reject_is_a_failure_and_changes_nothing(tmp_path: Path) -> None:
    store = open_store(tmp_path, 'on_duplicate = "reject"')
    ds = make_dataset()
    first = put(store, ds)
    ds.StudyDescription = "CHANGED"
    again = put(store, ds)
    assert (again.status, again.stored) == (DUPLICATE_REJECTED, False)
    assert object_files(store) == [store.objects.path_for(first.sha256)]
    assert Study.get().study_description == "CHEST"
    assert list(store.objects.tmp.iterdir()) == []
    store.close()


# --------------------------------------------------------------------------- validation


def test_sop_instance_uid_differs_from_request(store: Store) -> None:
    ds = make_dataset()
    r = put(store, ds, sop_uid=generate_uid())
    assert r.status == DATASET_MISMATCH and not r.stored
    assert "SOP Instance UID" in r.message
    assert_nothing_stored(store)


def test_sop_class_differs_from_request(store: Store) -> None:
    r = put(store, make_dataset(), sop_class=MRImageStorage)
    assert r.status == DATASET_MISMATCH
    assert_nothing_stored(store)


@pytest.mark.parametrize("bad", [
    "1.2." + "3" * 61,  # 65 characters
    "1.2.abc.4",  # not numeric
    "1.02.3",  # leading zero in a component
    "1..2",  # empty component
])
def test_malformed_uid_cannot_be_understood(store: Store, bad: str) -> None:
    with pydicom.config.disable_value_validation():
        ds = make_dataset(sop_uid=bad)
    r = put(store, ds)
    assert r.status == CANNOT_UNDERSTAND, r.message
    assert_nothing_stored(store)


def test_malformed_study_uid(store: Store) -> None:
    with pydicom.config.disable_value_validation():
        ds = make_dataset(study_uid="1.2.x")
    r = put(store, ds)
    assert r.status == CANNOT_UNDERSTAND
    assert_nothing_stored(store)


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID"])
def test_missing_study_or_series_uid(store: Store, keyword: str) -> None:
    ds = make_dataset()
    delattr(ds, keyword)
    r = put(store, ds)
    assert r.status == DATASET_MISMATCH and keyword.replace("InstanceUID", "") in \
        r.message.replace(" Instance UID", "")
    assert_nothing_stored(store)


def test_bytes_that_do_not_parse(store: Store) -> None:
    garbage = filemeta.file_meta_bytes(CTImageStorage, "1.2.3", ExplicitVRLittleEndian) + \
        b"\x08\x00\x16\x00UI\xff\xff" + os.urandom(3000)
    sp = store.spool()
    sp.write(garbage)
    r = store.ingest(sp, sop_class_uid=CTImageStorage, sop_instance_uid="1.2.3",
                     transfer_syntax=ExplicitVRLittleEndian, origin=ORIGIN)
    assert r.status == CANNOT_UNDERSTAND
    assert_nothing_stored(store)


def test_valid_uid_rule() -> None:
    assert ingest.valid_uid("0.1.2") and ingest.valid_uid("1.2.840.10008.1.2")
    assert ingest.valid_uid("2.25." + "1" * 59)  # 64 characters
    for bad in ["", "1.2.", ".1", "1.2.3a", "1.2.3 ", "2.25." + "1" * 60, "1.00"]:
        assert not ingest.valid_uid(bad), bad


# --------------------------------------------------------------------------- resources


class _Statvfs:
    def __init__(self, free: int) -> None:
        self.f_bavail = free // 4096
        self.f_frsize = 4096


def test_min_free_mb_refuses_with_a700_and_writes_nothing(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    store = open_store(tmp_path, "min_free_mb = 1024")
    monkeypatch.setattr(ingest.os, "statvfs", lambda _p: _Statvfs(512 * 1024 * 1024))
    sp = store.spool()
    sp.write(part10(make_dataset(pixels=100_000)))
    sp.flush()
    assert Path(sp.name).stat().st_size == 0  # refused while receiving: no disk used
    ds = make_dataset()
    r = put(store, ds)
    assert r.status == OUT_OF_RESOURCES and "min_free_mb" in r.message
    sp.abort()
    assert_nothing_stored(store)
    # and the check at ingest time catches space that went away during the receive
    monkeypatch.setattr(ingest.os, "statvfs", lambda _p: _Statvfs(2048 * 1024 * 1024))
    sp = store.spool()
    sp.write(part10(ds))
    monkeypatch.setattr(ingest.os, "statvfs", lambda _p: _Statvfs(1000 * 1024 * 1024))
    r = store.ingest(sp, sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID,
                     transfer_syntax=ExplicitVRLittleEndian, origin=ORIGIN)
    assert r.status == OUT_OF_RESOURCES
    assert_nothing_stored(store)
    store.close()


def test_max_object_mb(tmp_path: Path) -> None:
    store = open_store(tmp_path, "max_object_mb = 1")
    r = put(store, make_dataset(pixels=1_100_000))
    assert r.status == OUT_OF_RESOURCES and "max_object_mb" in r.message
    assert_nothing_stored(store)
    assert put(store, make_dataset(pixels=900_000)).ok
    store.close()


# --------------------------------------------------------------------------- atomicity


def test_index_failure_leaves_no_file_and_no_row(store: Store,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # the last statement of the transaction fails (after patient/study/series rows)
    monkeypatch.setattr(ingest, "_SQL_INSTANCE_INSERT", "INSERT INTO no_such_table VALUES (?)")
    r = put(store, make_dataset())
    assert r.status == OUT_OF_RESOURCES and not r.stored
    assert_nothing_stored(store)
    assert Patient.select().count() == 0  # the whole transaction rolled back
    assert Study.select().count() == 0


def test_failure_after_rename_removes_the_published_file(store: Store,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    real = objects._sync_directory

    def fail_after_rename(path: Any) -> None:
        if Path(path).parent.parent == store.objects.root:  # the object's own directory
            raise OSError(5, "Input/output error")
        real(path)

    monkeypatch.setattr(objects, "_sync_directory", fail_after_rename)
    r = put(store, make_dataset())
    assert r.status == OUT_OF_RESOURCES
    monkeypatch.setattr(objects, "_sync_directory", real)
    assert_nothing_stored(store)


def test_failure_during_write_then_restart_sweeps_leftover(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    store = Store.open(cfg)
    sp = store.spool()
    sp.write(b"\x00" * 5000)  # the sender vanished mid-transfer; the process dies:
    sp.close()  # its fd (and lock) go away, the temp file stays
    store.close()
    reopened = Store.open(cfg)
    assert reopened.swept == 1
    assert_nothing_stored(reopened)
    reopened.close()


def test_crash_between_publish_and_commit_is_undone_at_restart(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    store = Store.open(cfg)
    committed = put(store, make_dataset())  # an indexed object must survive the sweep
    sp = store.spool()
    sp.write(part10(make_dataset()))
    dest = store.objects.publish(sp)  # linked into place, then the process dies:
    sp.close()
    assert dest.exists()
    store.close()
    reopened = Store.open(cfg)
    assert reopened.swept == 1
    assert not dest.exists()
    assert object_files(reopened) == [reopened.objects.path_for(committed.sha256)]
    assert list(reopened.objects.tmp.iterdir()) == []
    reopened.close()


def test_crash_after_commit_keeps_the_object(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_config(tmp_path)
    store = Store.open(cfg)
    monkeypatch.setattr(objects.SpoolFile, "abort", objects.SpoolFile.close)  # dies before
    r = put(store, make_dataset())  # dropping the temp name
    monkeypatch.undo()
    assert len(list(store.objects.tmp.iterdir())) == 1
    store.close()
    reopened = Store.open(cfg)
    assert reopened.swept == 1
    assert object_files(reopened) == [reopened.objects.path_for(r.sha256)]
    assert objects.hash_file(reopened.objects.path_for(r.sha256)) == r.sha256
    reopened.close()


def test_concurrent_ingest_from_threads(store: Store) -> None:
    study, series = generate_uid(), generate_uid()
    results: list[IngestResult] = []
    shared = make_dataset(study_uid=study, series_uid=series)

    def worker() -> None:
        for _ in range(8):
            results.append(put(store, make_dataset(study_uid=study, series_uid=series)))
        results.append(put(store, shared))  # the same instance from every thread

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.ok for r in results), [r.message for r in results if not r.ok]
    assert Instance.select().count() == 33
    assert sum(1 for r in results if r.stored) == 33
    assert len(object_files(store)) == 33
    assert Series.select().count() == 1 and Study.select().count() == 1


# --------------------------------------------------------------------------- import path


def test_ingest_part10_file_keeps_dataset_bytes(store: Store, tmp_path: Path) -> None:
    ds = make_dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    src = tmp_path / "in.dcm"
    ds.save_as(src, enforce_file_format=True)
    raw = src.read_bytes()
    group_len = struct.unpack("<I", raw[140:144])[0]
    dataset_bytes = raw[144 + group_len:]
    r = store.ingest_part10_file(src, ORIGIN)
    assert r.ok, r.message
    stored = store.objects.path_for(r.sha256).read_bytes()
    assert stored == filemeta.file_meta_bytes(ds.SOPClassUID, ds.SOPInstanceUID,
                                              ImplicitVRLittleEndian) + dataset_bytes
    assert Instance.get().transfer_syntax == ImplicitVRLittleEndian
    assert store.ingest_part10_file(src, ORIGIN).duplicate


def test_ingest_part10_file_refuses_non_part10(store: Store, tmp_path: Path) -> None:
    p = tmp_path / "raw.dcm"
    p.write_bytes(encode(make_dataset()))  # no preamble, no meta
    r = store.ingest_part10_file(p, ORIGIN)
    assert r.status == CANNOT_UNDERSTAND and "Part 10" in r.message
    assert_nothing_stored(store)


# --------------------------------------------------------------------------- memory


def test_large_object_keeps_memory_flat(tmp_path: Path) -> None:
    """200 MB through SpoolFile + ingest in a fresh process: peak RSS grows < 40 MB."""
    write_config(tmp_path)
    script = textwrap.dedent(f"""
        import os, struct
        from pydicom.uid import generate_uid, ExplicitVRLittleEndian
        from tests.unit.test_store_ingest import make_dataset, encode, ORIGIN
        from pacsd import config
        from pacsd.store import filemeta
        from pacsd.store.ingest import Store

        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        store = Store.open(config.load({str(tmp_path / "pacsd.toml")!r}))
        ds = make_dataset()
        del ds.PixelData
        chunk = os.urandom(1 << 20)
        before = status("VmHWM:")
        sp = store.spool()
        sp.write(filemeta.file_meta_bytes(ds.SOPClassUID, ds.SOPInstanceUID,
                                          ExplicitVRLittleEndian))
        sp.write(encode(ds))
        n = 200 << 20
        sp.write(b"\\xe0\\x7f\\x10\\x00OW\\x00\\x00" + struct.pack("<I", n))
        for _ in range(200):
            sp.write(chunk)
        r = store.ingest(sp, sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID,
                         transfer_syntax=ExplicitVRLittleEndian, origin=ORIGIN)
        assert r.ok, r.message
        with store.open_verified(r.sha256) as f:
            pass
        print(before, status("VmHWM:"), r.size)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).parents[2], check=False)
    assert out.returncode == 0, out.stderr
    before, peak, size = map(int, out.stdout.split())
    assert size > 200 << 20
    assert peak - before < 40 << 20, f"peak RSS grew by {(peak - before) >> 20} MB"
