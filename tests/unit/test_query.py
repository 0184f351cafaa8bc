"""C-FIND identifier -> SQL: every matching type at every level, on a near-miss data set.

The index is filled through the peewee models (no network, no DICOM files): similar
names, adjacent dates, several patients per study date, values with SQL/GLOB specials.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from pacsd import config as configmod
from pacsd.store import index, query
from pacsd.store.query import PATIENT_ROOT, STUDY_ROOT, QueryError

NOW = "2026-01-01T00:00:00+00:00"

# patient_id, name, birth date, sex
PATIENTS = [
    ("P1", "DOE^JANE", "19700101", "F"),
    ("P2", "DOE^JOHN", "19700102", "M"),
    ("P3", "DOEL^JANE", "19691231", "F"),
    ("P4", "Doe^Jane", "19700101", "F"),
    ("P5", "O'BRIAN^50%_OFF", "19800101", "M"),
    ("P6", "[BRACKET]^X", "19900101", "O"),
    ("P7", "Müller^Jürgen", "19750505", "M"),
]
# study uid, patient, date, time, accession, description, [(series uid, modality, number,
#   [instance numbers])]
STUDIES: list[tuple[Any, ...]] = [
    ("1.2.1", "P1", "20240101", "083000", "ACC1", "CT HEAD",
     [("1.2.1.1", "CT", 1, [1, 2, 3]), ("1.2.1.2", "SR", 2, [1])]),
    ("1.2.2", "P1", "20240102", "090000", "ACC2", "CT CHEST",
     [("1.2.2.1", "CT", 1, [1, 2])]),
    ("1.2.3", "P2", "20240101", "235959", "ACC3", "MR KNEE",
     [("1.2.3.1", "MR", 1, [1]), ("1.2.3.2", "MR", 2, [1, 2])]),
    ("1.2.4", "P3", "20231231", "120000", "ACC10", "CT HEAD",
     [("1.2.4.1", "CT", 1, [1])]),
    ("1.2.5", "P4", "20240101", "000000", "ACC11", "XR HAND",
     [("1.2.5.1", "CR", 1, [1])]),
    ("1.2.6", "P5", "20240103", "101500.25", "A%_1", "US ABD",
     [("1.2.6.1", "US", 1, [1])]),
    ("1.2.7", "P6", "20240104", "101500", "[A]", "NM",
     [("1.2.7.1", "NM", 1, [1])]),
    ("1.2.8", "P7", "20240105", "110000", "ACC12", "CT Kopf",
     [("1.2.8.1", "CT", 1, [1])]),
]
CT = "1.2.840.10008.5.1.4.1.1.2"


def fill() -> None:
    patients = {}
    for pid, name, birth, sex in PATIENTS:
        patients[pid] = index.Patient.create(
            patient_id=pid, patient_name=name, patient_name_upper=name.upper(),
            patient_birth_date=birth, patient_sex=sex, created=NOW, updated=NOW)
    for suid, pid, date, time, acc, desc, series in STUDIES:
        st = index.Study.create(
            patient=patients[pid], study_instance_uid=suid, study_date=date,
            study_time=time, accession_number=acc, study_description=desc,
            modalities_in_study="\\".join(sorted({s[1] for s in series})),
            created=NOW, updated=NOW)
        for seuid, mod, num, instances in series:
            se = index.Series.create(study=st, series_instance_uid=seuid, modality=mod,
                                     series_number=num, created=NOW, updated=NOW)
            for n in instances:
                index.Instance.create(
                    series=se, sop_instance_uid=f"{seuid}.{n}", sop_class_uid=CT,
                    instance_number=n, sha256=f"{n:064x}", size=100,
                    transfer_syntax="1.2.840.10008.1.2.1", received=NOW)


@pytest.fixture
def db(tmp_path: Path) -> Any:
    p = tmp_path / "pacsd.toml"
    p.write_text("[storage]\nroot = 'data/objects'\nindex = 'data/index.sqlite'\n")
    cfg = configmod.load(p)
    d = index.open_index_db(cfg)
    fill()
    yield d
    d.close()


def ident(level: str, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def run(ds: Dataset, model: str = STUDY_ROOT, *, limit: int = 1000,
        ci: bool = False) -> list[Dataset]:
    return list(query.find(query.parse(ds, model), limit=limit, case_insensitive=ci))


def col(results: list[Dataset], kw: str) -> list[str]:
    return sorted(str(r.get(kw, "")) for r in results)


# ------------------------------------------------------------------ matching types
def test_single_value_person_name_is_exact_and_case_sensitive(db: Any) -> None:
    r = run(ident("STUDY", PatientName="DOE^JANE", StudyInstanceUID=""))
    assert col(r, "StudyInstanceUID") == ["1.2.1", "1.2.2"]  # not Doe^Jane, not DOEL^JANE


def test_case_insensitive_names_option(db: Any) -> None:
    r = run(ident("STUDY", PatientName="doe^jane", StudyInstanceUID=""), ci=True)
    assert col(r, "StudyInstanceUID") == ["1.2.1", "1.2.2", "1.2.5"]
    r = run(ident("STUDY", PatientName="doe^j*", StudyInstanceUID=""), ci=True)
    assert col(r, "StudyInstanceUID") == ["1.2.1", "1.2.2", "1.2.3", "1.2.5"]


def test_wildcards_star_and_question_mark(db: Any) -> None:
    r = run(ident("PATIENT", PatientName="DOE*", PatientID=""), PATIENT_ROOT)
    assert col(r, "PatientID") == ["P1", "P2", "P3"]
    r = run(ident("PATIENT", PatientName="DOE^J?NE", PatientID=""), PATIENT_ROOT)
    assert col(r, "PatientID") == ["P1"]
    r = run(ident("PATIENT", PatientName="*JANE", PatientID=""), PATIENT_ROOT)
    assert col(r, "PatientID") == ["P1", "P3"]
    r = run(ident("PATIENT", PatientName="D?E^*", PatientID=""), PATIENT_ROOT)
    assert col(r, "PatientID") == ["P1", "P2"]


def test_sql_and_glob_specials_are_literal(db: Any) -> None:
    r = run(ident("PATIENT", PatientName="O'BRIAN^50%_OFF", PatientID=""), PATIENT_ROOT)
    assert col(r, "PatientID") == ["P5"]
    r = run(ident("PATIENT", PatientName="*%*", PatientID=""), PATIENT_ROOT)
    assert col(r, "PatientID") == ["P5"]  # % is not a wildcard
    r = run(ident("PATIENT", PatientName="*_*", PatientID=""), PATIENT_ROOT)
    assert col(r, "PatientID") == ["P5"]  # _ is not a wildcard
    r = run(ident("PATIENT", PatientName="[BRACKET]*", PatientID=""), PATIENT_ROOT)
    assert col(r, "PatientID") == ["P6"]
    r = run(ident("STUDY", AccessionNumber="[A]", StudyInstanceUID=""))
    assert col(r, "StudyInstanceUID") == ["1.2.7"]
    r = run(ident("STUDY", AccessionNumber="A%_?", StudyInstanceUID=""))
    assert col(r, "StudyInstanceUID") == ["1.2.6"]
    r = run(ident("STUDY", AccessionNumber="ACC1*", StudyInstanceUID=""))
    assert col(r, "StudyInstanceUID") == ["1.2.1", "1.2.4", "1.2.5", "1.2.8"]


def test_uid_list_and_single_uid(db: Any) -> None:
    r = run(ident("STUDY", StudyInstanceUID="1.2.1\\1.2.3\\9.9"))
    assert col(r, "StudyInstanceUID") == ["1.2.1", "1.2.3"]
    r = run(ident("STUDY", StudyInstanceUID="1.2.1"))
    assert col(r, "StudyInstanceUID") == ["1.2.1"]
    r = run(ident("STUDY", StudyInstanceUID="1.2"))
    assert r == []  # a UID is never a prefix match


def test_date_single_and_ranges(db: Any) -> None:
    r = run(ident("STUDY", StudyDate="20240101", StudyInstanceUID=""))
    assert col(r, "StudyInstanceUID") == ["1.2.1", "1.2.3", "1.2.5"]  # 3 patients that day
    r = run(ident("STUDY", StudyDate="20240101-20240102", StudyInstanceUID=""))
    assert col(r, "StudyInstanceUID") == ["1.2.1", "1.2.2", "1.2.3", "1.2.5"]
    r = run(ident("STUDY", StudyDate="20240104-", StudyInstanceUID=""))
    assert col(r, "StudyInstanceUID") == ["1.2.7", "1.2.8"]
    r = run(ident("STUDY", StudyDate="-20231231", StudyInstanceUID=""))
    assert col(r, "StudyInstanceUID") == ["1.2.4"]


def test_time_ranges_include_fractions_and_partial_bounds(db: Any) -> None:
    r = run(ident("STUDY", StudyTime="1015-1015", StudyInstanceUID=""))
    assert col(r, "StudyInstanceUID") == ["1.2.6", "1.2.7"]
    r = run(ident("STUDY", StudyTime="-000000", StudyInstanceUID=""))
    assert col(r, "StudyInstanceUID") == ["1.2.5"]
    r = run(ident("STUDY", StudyTime="235959-", StudyInstanceUID=""))
    assert col(r, "StudyInstanceUID") == ["1.2.3"]


def test_universal_matching_returns_the_attribute(db: Any) -> None:
    r = run(ident("STUDY", StudyInstanceUID="", StudyDescription="", PatientName="*"))
    assert len(r) == len(STUDIES)
    assert all("StudyDescription" in x and "PatientName" in x for x in r)


def test_empty_stored_value_never_matches_a_value(db: Any) -> None:
    index.Study.update(study_date="").where(index.Study.study_instance_uid == "1.2.8").execute()
    r = run(ident("STUDY", StudyDate="-20991231", StudyInstanceUID=""))
    assert "1.2.8" not in col(r, "StudyInstanceUID")


def test_numbers_and_series_level(db: Any) -> None:
    r = run(ident("SERIES", StudyInstanceUID="1.2.3", SeriesNumber="2", SeriesInstanceUID=""))
    assert col(r, "SeriesInstanceUID") == ["1.2.3.2"]
    r = run(ident("SERIES", StudyInstanceUID="1.2.1", Modality="CT", SeriesInstanceUID=""))
    assert col(r, "SeriesInstanceUID") == ["1.2.1.1"]


def test_image_level_in_both_models(db: Any) -> None:
    r = run(ident("IMAGE", StudyInstanceUID="1.2.1", SeriesInstanceUID="1.2.1.1",
                  SOPInstanceUID="", InstanceNumber=""))
    assert col(r, "SOPInstanceUID") == ["1.2.1.1.1", "1.2.1.1.2", "1.2.1.1.3"]
    r = run(ident("IMAGE", PatientID="P1", StudyInstanceUID="1.2.1",
                  SeriesInstanceUID="1.2.1.1", SOPInstanceUID="1.2.1.1.2"), PATIENT_ROOT)
    assert col(r, "SOPInstanceUID") == ["1.2.1.1.2"]


def test_patient_root_study_level_by_patient_id(db: Any) -> None:
    r = run(ident("STUDY", PatientID="P1", StudyInstanceUID=""), PATIENT_ROOT)
    assert col(r, "StudyInstanceUID") == ["1.2.1", "1.2.2"]


# ------------------------------------------------------------------ returned keys
def test_only_requested_keys_plus_unique_key(db: Any) -> None:
    r = run(ident("STUDY", PatientID="P2"))
    assert len(r) == 1
    got = {e.keyword for e in r[0]}
    assert got == {"PatientID", "StudyInstanceUID", "QueryRetrieveLevel"}
    assert r[0].StudyInstanceUID == "1.2.3"


def test_unsupported_key_returned_empty(db: Any) -> None:
    r = run(ident("STUDY", StudyInstanceUID="1.2.1", StudyComments="x"))
    assert r[0].StudyComments in ("", None)


def test_computed_attributes(db: Any) -> None:
    r = run(ident("STUDY", StudyInstanceUID="1.2.1", NumberOfStudyRelatedSeries="",
                  NumberOfStudyRelatedInstances="", ModalitiesInStudy=""))
    assert r[0].NumberOfStudyRelatedSeries == 2
    assert r[0].NumberOfStudyRelatedInstances == 4
    assert list(r[0].ModalitiesInStudy) == ["CT", "SR"]
    r = run(ident("PATIENT", PatientID="P1", NumberOfPatientRelatedStudies="",
                  NumberOfPatientRelatedSeries="", NumberOfPatientRelatedInstances=""),
            PATIENT_ROOT)
    assert (r[0].NumberOfPatientRelatedStudies, r[0].NumberOfPatientRelatedSeries,
            r[0].NumberOfPatientRelatedInstances) == (2, 3, 6)
    r = run(ident("SERIES", StudyInstanceUID="1.2.3", SeriesInstanceUID="1.2.3.2",
                  NumberOfSeriesRelatedInstances=""))
    assert r[0].NumberOfSeriesRelatedInstances == 2


def test_modalities_in_study_matching(db: Any) -> None:
    r = run(ident("STUDY", ModalitiesInStudy="SR", StudyInstanceUID=""))
    assert col(r, "StudyInstanceUID") == ["1.2.1"]
    r = run(ident("STUDY", ModalitiesInStudy="MR\\US", StudyInstanceUID=""))
    assert col(r, "StudyInstanceUID") == ["1.2.3", "1.2.6"]


def test_specific_character_set(db: Any) -> None:
    ds = ident("STUDY", StudyInstanceUID="")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Jürgen"
    r = run(ds)
    assert col(r, "StudyInstanceUID") == ["1.2.8"]
    assert r[0].SpecificCharacterSet == "ISO_IR 100"
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "M?ller*"
    r = run(ds)
    assert col(r, "StudyInstanceUID") == ["1.2.8"]
    # no charset asked, non-ASCII answer: UTF-8 declared
    r = run(ident("STUDY", PatientID="P7", PatientName=""))
    assert r[0].SpecificCharacterSet == "ISO_IR 192"
    assert str(r[0].PatientName) == "Müller^Jürgen"


def test_limit_yields_one_more_than_the_cap(db: Any) -> None:
    r = run(ident("STUDY", StudyInstanceUID=""), limit=3)
    assert len(r) == 4  # the handler sends 3 and says there were more


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize("ds,model,status", [
    (Dataset(), STUDY_ROOT, 0xA900),  # no level
    (ident("PATIENT", PatientID=""), STUDY_ROOT, 0xA900),  # no PATIENT level in study root
    (ident("FRAME"), PATIENT_ROOT, 0xA900),
    (ident("STUDY", SeriesInstanceUID=""), STUDY_ROOT, 0xA900),  # key below level
    (ident("PATIENT", StudyDate="20240101"), PATIENT_ROOT, 0xA900),
    (ident("SERIES", SOPInstanceUID="1.2"), STUDY_ROOT, 0xA900),
    (ident("STUDY", StudyInstanceUID="\\".join(f"1.2.{i}" for i in range(10_000)))
     , STUDY_ROOT, 0xA700),
])
def test_malformed_identifiers_refused(db: Any, ds: Dataset, model: str, status: int) -> None:
    with pytest.raises(QueryError) as exc:
        run(ds, model)
    assert exc.value.status == status


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_wildcard_in_uid_refused(db: Any) -> None:
    with pytest.raises(QueryError) as exc:
        run(ident("STUDY", StudyInstanceUID="1.2.*"))
    assert exc.value.status == 0xA900


def test_audit_summary_has_keywords_not_values(db: Any) -> None:
    q = query.parse(ident("STUDY", PatientName="DOE*", StudyInstanceUID=""), STUDY_ROOT)
    assert q.summary() == {"model": "STUDY", "level": "STUDY", "query_keys": ["PatientName"]}


# ------------------------------------------------------------------ retrieve selection
def test_select_instances_by_level(db: Any) -> None:
    sel = query.select_instances(query.parse(ident("STUDY", StudyInstanceUID="1.2.1"),
                                             STUDY_ROOT), limit=100)
    assert [s.sop_instance_uid for s in sel] == ["1.2.1.1.1", "1.2.1.1.2", "1.2.1.1.3",
                                                 "1.2.1.2.1"]
    sel = query.select_instances(query.parse(ident("PATIENT", PatientID="P2"), PATIENT_ROOT),
                                 limit=100)
    assert len(sel) == 3
    sel = query.select_instances(query.parse(
        ident("IMAGE", StudyInstanceUID="1.2.1", SeriesInstanceUID="1.2.1.1",
              SOPInstanceUID="1.2.1.1.1\\1.2.1.1.3"), STUDY_ROOT), limit=100)
    assert [s.sop_instance_uid for s in sel] == ["1.2.1.1.1", "1.2.1.1.3"]
    # a higher-level key that does not fit selects nothing
    sel = query.select_instances(query.parse(
        ident("SERIES", StudyInstanceUID="1.2.2", SeriesInstanceUID="1.2.1.1"), STUDY_ROOT),
        limit=100)
    assert sel == []


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_select_instances_refusals(db: Any) -> None:
    with pytest.raises(QueryError) as exc:
        query.select_instances(query.parse(ident("STUDY", StudyInstanceUID=""), STUDY_ROOT),
                               limit=100)
    assert exc.value.status == 0xA900  # never "the whole archive"
    with pytest.raises(QueryError) as exc:
        query.select_instances(query.parse(ident("STUDY", StudyInstanceUID="1.2.*"),
                                           STUDY_ROOT), limit=100)
    assert exc.value.status == 0xA900
    with pytest.raises(QueryError) as exc:
        query.select_instances(query.parse(ident("PATIENT", PatientID="P1"), PATIENT_ROOT),
                               limit=3)
    assert exc.value.status == 0xA700


def _encoded_cases() -> list[tuple[Dataset, str]]:
    seq = ident("STUDY", StudyInstanceUID="")
    seq.add_new(0x00081110, "SQ", [])  # ReferencedStudySequence: not kept, returned empty
    seq.add_new(0x00080054, "AE", "")  # RetrieveAETitle
    seq.add_new(0x00080056, "CS", "")  # InstanceAvailability
    latin = ident("STUDY", StudyInstanceUID="", PatientName="*")
    latin.SpecificCharacterSet = "ISO_IR 100"
    utf8 = ident("PATIENT", PatientID="", PatientName="")
    utf8.SpecificCharacterSet = "ISO_IR 192"
    return [
        (ident("STUDY", PatientName="", PatientID="", StudyDate="", StudyTime="",
               AccessionNumber="", StudyDescription="", StudyInstanceUID="",
               ModalitiesInStudy="", NumberOfStudyRelatedSeries="",
               NumberOfStudyRelatedInstances="", SOPClassesInStudy="",
               ReferringPhysicianName="", StudyID=""), STUDY_ROOT),
        (ident("PATIENT", PatientID="", PatientName="", PatientBirthDate="", PatientSex="",
               NumberOfPatientRelatedStudies="", NumberOfPatientRelatedSeries="",
               NumberOfPatientRelatedInstances="", IssuerOfPatientID=""), PATIENT_ROOT),
        (ident("SERIES", StudyInstanceUID="1.2.1\\1.2.3", SeriesInstanceUID="", Modality="",
               SeriesNumber="", SeriesDescription="", NumberOfSeriesRelatedInstances=""),
         STUDY_ROOT),
        (ident("IMAGE", SOPInstanceUID="", SOPClassUID="", InstanceNumber=""), STUDY_ROOT),
        (ident("IMAGE", PatientID="P1", StudyInstanceUID="1.2.1", SeriesInstanceUID="1.2.1.1",
               SOPInstanceUID=""), PATIENT_ROOT),
        (seq, STUDY_ROOT), (latin, STUDY_ROOT), (utf8, PATIENT_ROOT),
        (ident("STUDY", StudyTime="101500", StudyDate=""), STUDY_ROOT),  # odd-length value
    ]


@pytest.mark.parametrize("implicit_vr", [True, False])
def test_encoded_identifiers_are_pydicoms_bytes(db: Any, implicit_vr: bool) -> None:
    """find_encoded writes what pydicom writes for find's Datasets, row for row, in both
    Little Endian encodings: ASCII rows by hand, non-ASCII ones (P7) through pydicom."""
    from pynetdicom.dsutils import encode

    seen_non_ascii = 0
    for ds, model in _encoded_cases():
        q = query.parse(ds, model)
        expected = [encode(d, implicit_vr, True) for d in query.find(q, limit=100,
                                                                      retrieve_ae="PACSD")]
        got = list(query.find_encoded(q, limit=100, implicit_vr=implicit_vr,
                                      retrieve_ae="PACSD"))
        assert got == expected, ds
        assert got and all(isinstance(b, bytes) for b in got)
        seen_non_ascii += sum("Müller".encode() in b or "Müller".encode("latin-1") in b
                              for b in got)
    assert seen_non_ascii >= 2


def test_encoder_writes_ascii_rows_itself(db: Any) -> None:
    q = query.parse(ident("STUDY", PatientName="", StudyInstanceUID="", StudyTime=""),
                    STUDY_ROOT)
    plan = query.build(q, limit=10)
    enc = query._Encoder(q, plan, "PACSD", True)
    rows = list(query._rows(plan))
    assert [enc.encode(r) is None for r in rows].count(True) == 1  # only Müller's row
