"""Short, deterministic slices of the fuzz harness (fuzz/): each target gets a bounded
number of derandomized examples from the same strategies `bench/fuzz` runs for minutes.
Findings the long runs made are pinned below as explicit regression cases."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from fuzz import pdu, strategies, targets
from pacsd import config as configmod

SLICE = settings(derandomize=True, max_examples=60, deadline=None, database=None,
                 suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from pacsd.auth.database import open_auth_db
    from pacsd.store.ingest import Store
    from tests.unit.test_query import fill

    d = tmp_path_factory.mktemp("fuzz")
    p = d / "pacsd.toml"
    p.write_text("[storage]\nmin_free_mb = 0\n[auth.password]\nbcrypt_rounds = 10\n")
    cfg = configmod.load(p)
    open_auth_db(cfg)
    store = Store.open(cfg)
    fill()
    work = d / "work"
    work.mkdir()
    yield {"cfg": cfg, "store": store, "work": work}
    store.close()


@SLICE
@given(strategies.any_associate_rq)
def test_fuzz_associate_rq(env: dict[str, Any], data: bytes) -> None:
    targets.associate_rq(data, env["cfg"], targets.Stats())


@SLICE
@given(strategies.command_sets(), strategies.st.one_of(strategies.st.none(),
                                                       strategies.st.binary(max_size=64)))
def test_fuzz_dimse_command_sets(data: bytes, dataset: bytes | None) -> None:
    targets.dimse(data, dataset, targets.Stats())


@SLICE
@given(strategies.identifiers(), strategies.st.sampled_from(
    ["1.2.840.10008.5.1.4.1.2.1.1", "1.2.840.10008.5.1.4.1.2.2.1"]))
def test_fuzz_cfind_identifiers(env: dict[str, Any], ident: tuple[bytes, bool],
                                model: str) -> None:
    from pacsd.store.query import PATIENT_ROOT, STUDY_ROOT

    targets.find_identifier(*ident, PATIENT_ROOT if model.endswith("2.1.1") else STUDY_ROOT,
                            targets.Stats())


@SLICE
@given(strategies.part10_files)
def test_fuzz_part10_import(env: dict[str, Any], data: bytes) -> None:
    targets.part10(data, env["store"], env["work"], targets.Stats())


def test_seeds_are_accepted(env: dict[str, Any]) -> None:
    """The seeds themselves go through: a target that refuses everything finds nothing."""
    s = targets.Stats()
    targets.associate_rq(strategies.seed_associate_rq(), env["cfg"], s)
    for c in strategies.SEED_COMMANDS[:3]:
        targets.dimse(c, b"" if c != strategies.SEED_COMMANDS[0] else None, s)
    targets.part10(strategies.seed_part10(), env["store"], env["work"], s)
    assert s.accepted == 5 and s.executions == 5, s


def test_finding_is_raised_for_success_without_row(env: dict[str, Any]) -> None:
    """The part10 oracle itself can fail: a store that says Success without a row."""
    class Liar:
        objects = env["store"].objects

        def ingest_part10_file(self, *_: Any) -> Any:
            from pacsd.store.ingest import SUCCESS, IngestResult

            return IngestResult(SUCCESS, True, False, "0" * 64, 1, "", "", "")

    with pytest.raises(targets.Finding):
        targets.part10(b"x", Liar(), env["work"], targets.Stats())


def test_pdu_builders_round_trip() -> None:
    prim = targets.decode_pdu(strategies.seed_associate_rq())
    assert prim is not None and prim.calling_ae_title == "MOD"
    assert len(prim.presentation_context_definition_list) == 2
    assert targets.decode_pdu(pdu.release_rq()) is not None


# ---------------------------------------------------------------- findings, pinned

def test_finding_sequence_where_a_name_is_expected_is_refused(env: dict[str, Any]) -> None:
    """Found by bench/fuzz: PatientName sent as SQ (explicit VR) passed query.parse and
    made query.find raise TypeError building the response, which the C-FIND handler
    answered as C001 (server fault, traceback, audit outcome 12). Now parse refuses a
    key whose VR is SQ where the attribute is not a sequence (or the reverse): A900."""
    from pacsd.store import query

    data = (b"\x08\x00R\x00CS\x06\x00STUDY \x10\x00\x10\x00SQ\x00\x00\xff\xff\xff\xff"
            b"\xfe\xff\x00\xe0\xff\xff\xff\xff\x10\x00 \x00LO\x02\x00X1\xfe\xff\r\xe0"
            b"\x00\x00\x00\x00\xfe\xff\xdd\xe0\x00\x00\x00\x00")
    with pytest.raises(query.QueryError) as exc:
        query.parse(targets.decode_identifier(data, False), query.STUDY_ROOT)
    assert exc.value.status == 0xA900 and "PatientName" in exc.value.comment
    s = targets.Stats()
    targets.find_identifier(data, False, query.STUDY_ROOT, s)
    assert s.rejected == 1


def test_finding_malformed_command_set_aborts_instead_of_killing_the_dul() -> None:
    """Found by the wire fuzzer: a command set without CommandField (or with a
    CommandDataSetType that is not US) raised AttributeError inside pynetdicom's
    decode_msg, in the state machine's action: the DUL thread died with a traceback and
    the peer saw a bare close, unaudited. scp/limits.py now queues an abort (Evt19)."""
    from pynetdicom.dimse_messages import DIMSEMessage
    from pynetdicom.pdu_primitives import P_DATA

    from pacsd.scp import limits

    limits.apply()
    no_field = struct.pack("<HHI", 0, 0x0002, 2) + b"1\0"
    for cmd in (no_field, pdu.command(0x0030, 1, sop_class=pdu.VERIFICATION)[:-10]):
        p = P_DATA()
        p.presentation_data_value_list = [[1, b"\x03" + cmd]]  # type: ignore[list-item]
        assoc = targets._FakeAssoc()
        assert DIMSEMessage().decode_msg(p, assoc) is False
        assert assoc.dul.event_queue.get_nowait() == "Evt19"
    s = targets.Stats()
    targets.dimse(no_field, None, s)
    assert s.rejected == 1 and not s.findings


def test_finding_non_ascii_uid_in_file_meta_is_c000(env: dict[str, Any]) -> None:
    """Found by bench/fuzz: a Part 10 file whose MediaStorageSOPClassUID holds a 0xFF byte
    made ingest_part10_file raise UnicodeEncodeError (packing the new file meta) instead
    of returning C000: `pacsd import` and the inbox got a traceback."""
    from pacsd.store.ingest import CANNOT_UNDERSTAND, Origin

    seed = strategies.seed_part10()
    uid = b"1.2.840.10008.5.1.4.1.1.2"
    bad = seed.replace(uid, b"\xff" + uid[1:], 1)
    assert bad != seed
    f = env["work"] / "bad.dcm"
    f.write_bytes(bad)
    r = env["store"].ingest_part10_file(f, Origin(calling_ae="T", source_ip="127.0.0.1",
                                                  username="", assoc_id="b" * 32))
    assert r.status == CANNOT_UNDERSTAND and "invalid UID" in r.message
    s = targets.Stats()
    targets.part10(bad, env["store"], env["work"], s)
    assert s.rejected == 1


def test_finding_uid_list_of_only_backslashes_is_a900(env: dict[str, Any]) -> None:
    """Found by bench/fuzz: StudyInstanceUID = '\\\\\\' (a list of empty UIDs) raised
    IndexError in query.build (C-FIND) and select_instances (C-MOVE/C-GET), answered as
    C001 server faults. Now A900."""
    from pacsd.store import query

    data = b"\x08\x00R\x00CS\x06\x00STUDY  \x00\r\x00UI\x04\x00\\\\\\ "
    q = query.parse(targets.decode_identifier(data, False), query.STUDY_ROOT)
    with pytest.raises(query.QueryError) as exc:
        list(query.find(q, limit=10))
    assert exc.value.status == 0xA900
    with pytest.raises(query.QueryError) as exc:
        query.select_instances(q, limit=10)
    assert exc.value.status == 0xA900
