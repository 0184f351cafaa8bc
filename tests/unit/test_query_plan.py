"""EXPLAIN QUERY PLAN for each level's common C-FIND queries: indexes, never a table scan.

A scan is what turns a millisecond query into seconds at a million instances; the plans are
checked on the migrated schema (empty tables give the planner no statistics, which is the
worst case for it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from pacsd import config as configmod
from pacsd.store import index, query
from pacsd.store.query import PATIENT_ROOT, STUDY_ROOT


@pytest.fixture
def db(tmp_path: Path) -> Any:
    p = tmp_path / "pacsd.toml"
    p.write_text("[storage]\nroot = 'data/objects'\nindex = 'data/index.sqlite'\n")
    d = index.open_index_db(configmod.load(p))
    yield d
    d.close()


def ident(level: str, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


CASES = [
    # (level, model, keys, an index the plan must use)
    ("PATIENT", PATIENT_ROOT, {"PatientID": "P1", "PatientName": ""},
     "patient_id_idx"),
    ("PATIENT", PATIENT_ROOT, {"PatientName": "DOE*", "PatientID": "",
                               "NumberOfPatientRelatedStudies": ""}, "patient_name_idx"),
    ("STUDY", STUDY_ROOT, {"PatientID": "P1", "StudyInstanceUID": "", "ModalitiesInStudy": "",
                           "NumberOfStudyRelatedInstances": ""}, "study_patient_idx"),
    ("STUDY", STUDY_ROOT, {"PatientName": "DOE*", "StudyInstanceUID": ""},
     "patient_name_idx"),
    ("STUDY", STUDY_ROOT, {"StudyDate": "20240101-20240131", "StudyInstanceUID": ""},
     "study_date_cover_idx"),
    # the keys a workstation's "studies of these days" asks for: answered from the index
    ("STUDY", STUDY_ROOT, {"StudyDate": "20240101-", "StudyTime": "", "AccessionNumber": "",
                           "StudyID": "", "StudyDescription": "", "ReferringPhysicianName": "",
                           "StudyInstanceUID": "", "PatientName": "", "PatientID": ""},
     "COVERING INDEX study_date_cover_idx"),
    ("STUDY", STUDY_ROOT, {"AccessionNumber": "ACC1", "StudyInstanceUID": ""},
     "study_accession_idx"),
    ("STUDY", STUDY_ROOT, {"StudyInstanceUID": "1.2.3"}, "sqlite_autoindex_study_1"),
    ("STUDY", PATIENT_ROOT, {"PatientID": "P1", "StudyInstanceUID": ""}, "study_patient_idx"),
    ("SERIES", STUDY_ROOT, {"StudyInstanceUID": "1.2.1", "SeriesInstanceUID": "",
                            "Modality": "", "NumberOfSeriesRelatedInstances": ""},
     "series_study_idx"),
    ("IMAGE", STUDY_ROOT, {"StudyInstanceUID": "1.2.1", "SeriesInstanceUID": "1.2.1.1",
                           "SOPInstanceUID": ""}, "instance_series_idx"),
    ("IMAGE", STUDY_ROOT, {"StudyInstanceUID": "1.2.1", "SOPInstanceUID": "1.2.1.1.1"},
     "sqlite_autoindex_instance_1"),
]


@pytest.mark.parametrize("level,model,keys,want", CASES)
def test_common_queries_use_indexes(db: Any, level: str, model: str, keys: dict[str, str],
                                    want: str) -> None:
    plan = query.build(query.parse(ident(level, **keys), model), limit=1000)
    sql, params = plan.select.sql()
    lines = [r[3] for r in db.execute_sql("EXPLAIN QUERY PLAN " + sql, params).fetchall()]
    assert not [line for line in lines if line.startswith("SCAN")], lines
    assert any(want in line for line in lines), lines


@pytest.mark.parametrize("level,keys", [
    ("STUDY", {"StudyInstanceUID": "1.2.1"}),
    ("SERIES", {"StudyInstanceUID": "1.2.1", "SeriesInstanceUID": "1.2.1.1"}),
    ("PATIENT", {"PatientID": "P1"}),
])
def test_retrieve_selection_uses_indexes(db: Any, level: str, keys: dict[str, str]) -> None:
    q = query.parse(ident(level, **keys), PATIENT_ROOT)
    captured: list[str] = []
    orig = db.execute_sql

    def spy(sql: str, params: Any = None, *a: Any, **kw: Any) -> Any:
        captured.extend(r[3] for r in orig("EXPLAIN QUERY PLAN " + sql, params).fetchall())
        return orig(sql, params, *a, **kw)

    db.execute_sql = spy
    try:
        query.select_instances(q, limit=10)
    finally:
        del db.execute_sql
    assert captured and not [c for c in captured if c.startswith("SCAN")], captured
