"""verify_all: finds corrupt, missing and orphan objects, and nothing on a clean store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pacsd.store.index import Instance
from pacsd.store.ingest import Store
from pacsd.store.verify import Problem, verify_all
from tests.unit.test_store_ingest import make_dataset, put, write_config


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = Store.open(write_config(tmp_path))
    yield s
    s.close()


def _fill(store: Store, n: int = 3) -> list[str]:
    shas = []
    for i in range(n):
        r = put(store, make_dataset(patient_id=f"P{i}"))
        assert r.ok
        shas.append(r.sha256)
    return shas


def test_clean_store(store: Store) -> None:
    shas = _fill(store)
    report = verify_all(store)
    assert report.ok
    assert report.checked == 3
    assert report.bytes == sum(store.objects.path_for(s).stat().st_size for s in shas)
    assert report.summary().startswith("verified 3 objects")


def test_flipped_byte_is_corrupt_and_named(store: Store) -> None:
    shas = _fill(store)
    path = store.objects.path_for(shas[1])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    seen: list[Problem] = []
    report = verify_all(store, on_problem=seen.append)
    assert not report.ok
    assert [(p.kind, p.path) for p in report.problems] == [("corrupt", str(path))]
    assert seen == report.problems
    uid = Instance.get(Instance.sha256 == shas[1]).sop_instance_uid
    assert report.problems[0].sop_instance_uid == uid
    assert str(path) in report.problems[0].line() and uid in report.problems[0].line()


def test_missing_file(store: Store) -> None:
    shas = _fill(store)
    store.objects.path_for(shas[0]).unlink()
    report = verify_all(store)
    assert [p.kind for p in report.problems] == ["missing"]
    assert report.problems[0].sha256 == shas[0]
    assert report.count("missing") == 1 and report.checked == 2


def test_orphans_stray_files_and_temp_leftovers(store: Store) -> None:
    shas = _fill(store)
    Instance.delete().where(Instance.sha256 == shas[2]).execute()  # row gone, file stays
    stray = store.objects.root / "ab" / "notes.txt"
    stray.parent.mkdir(exist_ok=True)
    stray.write_text("x")
    leftover = store.objects.tmp / "spool-dead.tmp"
    leftover.write_bytes(b"partial")
    live = store.spool()  # an in-flight receive is not an orphan
    live.write(b"in flight")
    report = verify_all(store)
    orphans = sorted(p.path for p in report.problems if p.kind == "orphan")
    assert orphans == sorted([str(store.objects.path_for(shas[2])), str(stray),
                              str(leftover)])
    assert report.count("orphan") == 3 and report.count("corrupt") == 0
    live.abort()
