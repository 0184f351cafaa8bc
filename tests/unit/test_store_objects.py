"""Object files: fast file meta vs pydicom, SpoolFile, atomic publish, verified reads, sweep."""

from __future__ import annotations

import gc
import hashlib
import io
import os
from pathlib import Path

import pytest
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom.dsutils import create_file_meta

from pacsd.store import filemeta, objects
from pacsd.store.objects import HEAD_SIZE, IntegrityError, ObjectStore, SpoolFile

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.mark.parametrize(("sop_instance", "ts"), [
    ("1.2.3.44", "1.2.840.10008.1.2.1"),  # even-length UID
    ("1.2.3.4", "1.2.840.10008.1.2"),  # odd-length: NUL padding
    ("2.25." + "9" * 59, "1.2.840.10008.1.2.4.50"),  # 64 characters
])
def test_file_meta_bytes_equal_pydicom(tmp_path: Path, sop_instance: str, ts: str) -> None:
    ours = filemeta.file_meta_bytes(CT, sop_instance, ts)
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, create_file_meta(
        sop_class_uid=UID(CT), sop_instance_uid=UID(sop_instance), transfer_syntax=UID(ts),
        implementation_uid=UID(filemeta.IMPLEMENTATION_CLASS_UID),
        implementation_version=filemeta.IMPLEMENTATION_VERSION_NAME))
    assert ours == buf.getvalue()
    # and it parses back to the same elements
    p = tmp_path / "meta.dcm"
    p.write_bytes(ours)
    meta = read_file_meta_info(p)
    assert meta.MediaStorageSOPClassUID == CT
    assert meta.MediaStorageSOPInstanceUID == sop_instance
    assert meta.TransferSyntaxUID == ts
    assert meta.ImplementationVersionName == "PACSD_0.1"
    assert meta.FileMetaInformationGroupLength == len(ours) - 132 - 12


def test_file_meta_refuses_non_ascii_uid() -> None:
    with pytest.raises(ValueError):
        filemeta.file_meta_bytes(CT, "1.2.3.\u00e9", "1.2.840.10008.1.2.1")


def test_spool_hashes_counts_and_keeps_head(tmp_path: Path) -> None:
    data = os.urandom(HEAD_SIZE + 12_345)
    sp = SpoolFile(tmp_path, delete=False, mode="wb", suffix=".dcm")  # NamedTemporaryFile kw
    assert Path(sp.name).parent == tmp_path
    # small writes are gathered, big ones go straight through; memoryviews accepted
    sp.write(data[:10])
    sp.file.flush()
    sp.write(memoryview(data)[10:1000])
    assert sp.write(data[1000:]) == len(data) - 1000
    with pytest.raises(ValueError):
        _ = sp.sha256  # not before close
    sp.close()
    sp.close()  # idempotent
    assert sp.size == len(data)
    assert sp.sha256 == hashlib.sha256(data).hexdigest()
    assert sp.head == data[:HEAD_SIZE]
    assert not sp.head_complete
    assert Path(sp.name).read_bytes() == data
    assert oct(Path(sp.name).stat().st_mode & 0o777) == "0o600"
    sp.abort()
    assert not Path(sp.name).exists()


def test_spool_over_limit_stops_writing(tmp_path: Path) -> None:
    sp = SpoolFile(tmp_path, limit=1000)
    sp.write(b"x" * 600)
    sp.write(b"x" * 600)
    sp.flush()
    assert sp.over_limit
    assert sp.size == 1200
    assert Path(sp.name).stat().st_size == 0  # space given back
    sp.abort()


def test_publish_is_content_addressed_and_verified_read(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "objects")
    store.ensure()
    sp = store.spool()
    sp.write(b"hello world")
    dest = store.publish(sp)
    assert dest.stat().st_nlink == 2  # the temp name stays as a marker until committed
    sp.abort()
    assert dest.stat().st_nlink == 1
    sha = hashlib.sha256(b"hello world").hexdigest()
    assert dest == tmp_path / "objects" / sha[:2] / sha[2:4] / f"{sha}.dcm"
    assert dest.read_bytes() == b"hello world"
    assert list(store.tmp.iterdir()) == []
    with store.open_verified(sha) as f:
        assert f.read() == b"hello world"
    assert store.verified_path(sha) == dest
    # a flipped byte is refused, with a typed error naming the object
    dest.write_bytes(b"hellO world")
    with pytest.raises(IntegrityError) as exc:
        store.open_verified(sha)
    assert exc.value.sha256 == sha and exc.value.actual != sha
    dest.unlink()
    with pytest.raises(IntegrityError) as exc:
        store.verified_path(sha)
    assert exc.value.actual is None


def test_path_for_refuses_anything_but_a_digest(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path)
    for bad in ["../../etc/passwd", "A" * 64, "0" * 63, "0" * 64 + "/x"]:
        with pytest.raises(ValueError):
            store.path_for(bad)


def test_sweep_removes_leftovers_but_not_live_spools(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "objects")
    store.ensure()
    live = store.spool()
    live.write(b"in flight")
    live.flush()
    leftover = store.tmp / "spool-crashed.tmp"
    leftover.write_bytes(b"partial")
    closed = store.spool()
    closed.write(b"closed but not published")
    closed.close()  # its lock is gone with the fd: a leftover now
    assert sorted(p.name for p in store.temp_leftovers()) == sorted(
        [leftover.name, Path(closed.name).name])
    assert store.sweep_tmp() == 2
    assert Path(live.name).exists()
    assert not leftover.exists()
    live.abort()


def test_write_all_handles_short_writes(monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    real = os.writev

    def short(fd: int, bufs: list[memoryview]) -> int:
        return real(fd, [bufs[0][:7]])  # never more than 7 bytes per call

    monkeypatch.setattr(objects.os, "writev", short)
    p = tmp_path / "f"
    fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o600)
    objects._write_all(fd, [b"abcdefghij", bytearray(b"KLMNOPQRSTUVWXYZ")])
    os.close(fd)
    assert p.read_bytes() == b"abcdefghijKLMNOPQRSTUVWXYZ"


def test_pynetdicom_stand_ins_write_the_same_group(tmp_path: Path) -> None:
    """What app.py binds into pynetdicom's dimse_messages writes what pydicom would."""
    sp = SpoolFile(tmp_path)
    sp.write(b"\x00" * 128)  # pynetdicom writes preamble and DICM itself
    sp.write(b"DICM")
    filemeta.write_meta_uids(sp, filemeta.create_meta_uids(
        sop_class_uid=UID(CT), sop_instance_uid=UID("1.2.3.4"),
        transfer_syntax=UID("1.2.840.10008.1.2.1")))
    sp.close()
    assert Path(sp.name).read_bytes() == filemeta.file_meta_bytes(CT, "1.2.3.4",
                                                                  "1.2.840.10008.1.2.1")
    sp.abort()


def test_abandoned_spool_is_removed_when_dropped(tmp_path: Path) -> None:
    sp = SpoolFile(tmp_path)
    sp.write(b"half a dataset")
    name = Path(sp.name)
    del sp
    gc.collect()
    assert not name.exists()  # abort() closes the descriptor before it unlinks


def test_publish_marker_names_the_object_for_the_sweep(tmp_path: Path) -> None:
    """A process that dies between publish and the index commit leaves root/.tmp/pub-<sha>-…;
    the sweep removes it and the object even when the object's bytes never reached the
    disk (power loss before the fsync: the content no longer hashes to its name)."""
    store = ObjectStore(tmp_path / "objects")
    store.ensure()
    sp = store.spool()
    sp.write(b"an object whose index row was never committed")
    dest = store.publish(sp)
    assert Path(sp.name).name.startswith(f"pub-{dest.stem}-spool-")
    assert Path(sp.name).stat().st_nlink == 2
    sp.close()  # the process died: its lock is gone, the marker stays
    dest.write_bytes(b"")  # what a power loss before the data fsync may leave
    keep = store.spool()
    keep.write(b"another object, indexed")
    kept = store.publish(keep)
    keep.abort()  # committed: the marker goes, the object stays
    assert store.sweep_tmp(lambda sha: sha == kept.stem) == 1
    assert not dest.exists()
    assert kept.exists()
    assert list(store.tmp.iterdir()) == []


def test_the_same_object_published_twice_at_once_keeps_two_markers(tmp_path: Path) -> None:
    """Two threads publishing identical bytes must not share a marker name: the first
    one's abort() would drop the second one's spool before it is linked (ENOENT)."""
    store = ObjectStore(tmp_path / "objects")
    store.ensure()
    first, second = store.spool(), store.spool()
    for sp in (first, second):
        sp.write(b"the same instance, sent by two modalities at once")
    dest = store.publish(first)
    assert store.publish(second) == dest
    assert Path(first.name).exists()  # still marks the first publish until its commit
    assert first.name != second.name
    first.abort()
    second.abort()
    assert dest.read_bytes() == b"the same instance, sent by two modalities at once"
    assert list(store.tmp.iterdir()) == []


def test_publish_over_an_existing_object_replaces_it_only_after_fsync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ObjectStore(tmp_path / "objects")
    store.ensure()
    first = store.spool()
    first.write(b"same bytes")
    dest = store.publish(first)
    first.abort()
    dest.chmod(0o600)
    dest.write_bytes(b"damaged")  # healed by the next identical object
    order: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (order.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace",
                        lambda a, b: (order.append("replace"), real_replace(a, b))[1])
    again = store.spool()
    again.write(b"same bytes")
    assert store.publish(again) == dest
    again.abort()
    assert dest.read_bytes() == b"same bytes"
    assert order.index("fsync") < order.index("replace")
