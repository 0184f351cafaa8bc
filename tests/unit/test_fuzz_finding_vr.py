"""Pinned finding of the 10-minute bench/fuzz run (issue 9, 2026-11-29): a C-FIND key sent
with a VR that is not the attribute's (PatientName as DS) passed query.parse; building the
response then put the stored name into a DS element and pydicom raised ValueError
("could not convert string to float: 'DOE^JANE'"), which the C-FIND handler answers as
C001 (server fault, traceback, audit outcome 12). Now parse refuses it: A900, naming the
key, as it already did for a sequence where a value is expected."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fuzz import targets
from pacsd import config as configmod

# the falsifying example as hypothesis reported it (explicit VR little endian):
# SpecificCharacterSet ISO_IR 100, QueryRetrieveLevel STUDY, PatientName as DS, empty
PATIENT_NAME_AS_DS = (b"\x08\x00\x05\x00CS\n\x00ISO_IR 100\x08\x00R\x00CS\x06\x00STUDY "
                      b"\x10\x00\x10\x00DS\x00\x00")


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    from pacsd.auth.database import open_auth_db
    from pacsd.store.ingest import Store
    from tests.unit.test_query import fill

    d: Path = tmp_path_factory.mktemp("vr")
    p = d / "pacsd.toml"
    p.write_text("[storage]\nmin_free_mb = 0\n[auth.password]\nbcrypt_rounds = 10\n")
    cfg = configmod.load(p)
    open_auth_db(cfg)
    store = Store.open(cfg)
    fill()  # has a study of DOE^JANE, so the unfixed code reached the response
    yield
    store.close()


def test_finding_name_sent_as_ds_is_refused_not_a_server_fault(filled: Any) -> None:
    from pacsd.store import query

    with pytest.raises(query.QueryError) as exc:
        query.parse(targets.decode_identifier(PATIENT_NAME_AS_DS, False), query.STUDY_ROOT)
    assert exc.value.status == 0xA900
    assert "PatientName" in exc.value.comment and "DS" in exc.value.comment
    s = targets.Stats()
    targets.find_identifier(PATIENT_NAME_AS_DS, False, query.STUDY_ROOT, s)  # no Finding
    assert s.rejected == 1


def test_keys_in_their_own_vr_still_match(filled: Any) -> None:
    from pacsd.store import query

    ok = PATIENT_NAME_AS_DS.replace(b"\x10\x00\x10\x00DS\x00\x00",
                                    b"\x10\x00\x10\x00PN\x00\x00")
    q = query.parse(targets.decode_identifier(ok, False), query.STUDY_ROOT)
    names = {str(ds.PatientName) for ds in query.find(q, limit=100)}
    assert "DOE^JANE" in names
