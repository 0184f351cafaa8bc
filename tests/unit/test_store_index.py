"""The index schema: migrations create what the models describe, with the C-FIND indexes."""

from __future__ import annotations

from pathlib import Path

import peewee
import pytest

from pacsd import config as configmod
from pacsd.store import index


@pytest.fixture
def cfg(tmp_path: Path) -> configmod.Config:
    p = tmp_path / "pacsd.toml"
    p.write_text("[storage]\nroot = 'data/objects'\nindex = 'data/index.sqlite'\n")
    return configmod.load(p)


def test_models_match_migrated_tables(cfg: configmod.Config) -> None:
    db = index.open_index_db(cfg)
    for model in index.MODELS:
        cols = {c.name for c in db.get_columns(model._meta.table_name)}
        fields = {f.column_name for f in model._meta.sorted_fields}
        assert cols == fields, model


def test_indexes_for_cfind_exist(cfg: configmod.Config) -> None:
    db = index.open_index_db(cfg)
    indexed: set[tuple[str, str]] = set()
    for table in ("patient", "study", "series", "instance"):
        for idx in db.get_indexes(table):
            indexed.add((table, idx.columns[0]))
    for want in [("patient", "patient_id"), ("patient", "patient_name"),
                 ("patient", "patient_name_upper"), ("study", "study_date"),
                 ("study", "accession_number"), ("study", "study_instance_uid"),
                 ("study", "patient_pk"), ("series", "series_instance_uid"),
                 ("series", "modality"), ("series", "study_pk"),
                 ("instance", "sop_instance_uid"), ("instance", "series_pk"),
                 ("instance", "sha256")]:
        assert want in indexed, want


def test_foreign_keys_enforced_and_reopen_is_idempotent(cfg: configmod.Config) -> None:
    index.open_index_db(cfg)
    now = "2026-01-01T00:00:00+00:00"
    p = index.Patient.create(patient_id="P1", patient_name="Doe^Jane",
                             patient_name_upper="DOE^JANE", created=now, updated=now)
    st = index.Study.create(patient=p, study_instance_uid="1.2.3", created=now, updated=now)
    with pytest.raises(peewee.IntegrityError):
        index.Series.create(study=99999, series_instance_uid="1.2.3.4", created=now,
                            updated=now)
    se = index.Series.create(study=st, series_instance_uid="1.2.3.4", modality="CT",
                             series_number=3, created=now, updated=now)
    index.Instance.create(series=se, sop_instance_uid="1.2.3.4.5", sop_class_uid="1.2",
                          sha256="0" * 64, size=1, transfer_syntax="1.2.840.10008.1.2.1",
                          received=now)
    db2 = index.open_index_db(cfg)  # second open: no migration re-applied, data kept
    assert db2.execute_sql("SELECT max(version) FROM schema_version").fetchone()[0] == len(
            index.MIGRATIONS)
    row = (index.Instance.select(index.Instance, index.Series, index.Study, index.Patient)
           .join(index.Series).join(index.Study).join(index.Patient)
           .where(index.Patient.patient_name_upper == "DOE^JANE").get())
    assert row.series.study.study_instance_uid == "1.2.3"
    assert row.series.series_number == 3
