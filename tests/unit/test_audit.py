"""The audit API: vocabulary, refusal of secrets, per-association context, ATNA rendering."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from lxml import etree

from pacsd import audit
from pacsd.audit import atna, events
from pacsd.audit.events import DICOM_EVENTS, Event, Outcome
from pacsd.audit.syslog import format_message

DESIGN_EVENTS = {
    "app.start", "app.stop", "assoc.accepted", "assoc.rejected", "auth.login", "auth.failure",
    "auth.lockout", "dicom.store", "dicom.query", "dicom.retrieve", "integrity.failure",
    "admin.user", "admin.ae", "config.reload", "alert.anomaly",
}


def test_vocabulary_covers_design_and_every_event_has_a_dicom_code() -> None:
    names = {e.value for e in Event}
    assert names >= DESIGN_EVENTS
    assert {"assoc.released", "assoc.aborted", "audit.dropped"} <= names
    assert set(DICOM_EVENTS) == set(Event)
    assert DICOM_EVENTS[Event.DICOM_STORE].event_id.code == "110104"
    assert DICOM_EVENTS[Event.DICOM_QUERY].event_id.code == "110112"
    assert DICOM_EVENTS[Event.DICOM_RETRIEVE].event_id.code == "110102"
    assert DICOM_EVENTS[Event.APP_START].event_id.code == "110100"
    assert DICOM_EVENTS[Event.AUTH_LOGIN].event_id.code == "110114"
    for e in (Event.ASSOC_REJECTED, Event.INTEGRITY_FAILURE, Event.ALERT_ANOMALY):
        assert DICOM_EVENTS[e].event_id.code == "110113"
    assert [int(o) for o in Outcome] == [0, 4, 8, 12]


def test_unknown_event_or_outcome_is_refused() -> None:
    with pytest.raises(ValueError):
        audit.record("dicom.stored")
    with pytest.raises(ValueError):
        audit.record(Event.APP_START, 3)


@pytest.mark.parametrize("name", [
    "password", "new_password", "passcode", "passwd", "secret", "client_secret", "totp",
    "totp_code", "otp", "code", "token", "key", "private_key", "privkey", "passphrase",
    "credentials", "api_token", "pin",
])
def test_secret_like_field_names_are_refused(name: str) -> None:
    with audit.capture() as got, pytest.raises(ValueError, match="secret"):
        audit.record(Event.AUTH_FAILURE, Outcome.SERIOUS, **{name: "hunter2-hunter2"})
    assert got == []


@pytest.mark.parametrize("name", ["user", "reason", "gate", "study_uid", "instances", "bytes",
                                  "cert_sha256", "target_ae", "service", "keep_alive_s"])
def test_ordinary_field_names_pass(name: str) -> None:
    if name == "keep_alive_s":  # "keep" is not the word "key"
        assert not events.secret_like(name)
        return
    with audit.capture() as got:
        audit.record(Event.DICOM_STORE, **{name: "x"})
    assert got[0][name] == "x"


def test_private_key_as_value_and_non_scalars_are_refused() -> None:
    pem = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMG\n-----END PRIVATE KEY-----\n"
    with pytest.raises(ValueError, match="private key"):
        audit.record(Event.ADMIN_AE, note=pem)
    with pytest.raises(ValueError):
        audit.record(Event.ADMIN_AE, detail={"nested": 1})
    with pytest.raises(ValueError):
        audit.record(Event.ADMIN_AE, seq=5)  # reserved
    with pytest.raises(ValueError):
        audit.record(Event.ADMIN_AE, Weird=1)


def test_record_without_a_role_does_not_crash() -> None:
    audit.shutdown(0.1)
    assert isinstance(audit.current(), audit.NullSink)
    audit.record(Event.APP_START)


def test_association_context_is_merged_and_restored() -> None:
    with audit.capture() as got:
        with audit.association(assoc_id="a1", source_ip="10.0.0.5", calling_ae="CT1"):
            audit.record(Event.DICOM_STORE, study_uid="1.2.3", instances=2, bytes=10)
            with audit.association(user="alice"):
                audit.record(Event.AUTH_LOGIN)
            audit.record(Event.ASSOC_RELEASED)
        audit.record(Event.APP_STOP)
    store, login, released, stop = got
    assert store["assoc_id"] == "a1" and store["calling_ae"] == "CT1"
    assert store["event"] == "dicom.store" and store["outcome"] == 0
    assert store["ts"].endswith("Z")
    assert login["user"] == "alice" and login["assoc_id"] == "a1"
    assert "user" not in released and released["source_ip"] == "10.0.0.5"
    assert "assoc_id" not in stop


def test_context_is_per_thread_and_names_are_closed() -> None:
    with pytest.raises(ValueError):
        audit.bind(password="x")
    seen: dict[str, dict[str, object]] = {}

    def worker(name: str) -> None:
        audit.bind(assoc_id=name)
        seen[name] = audit.context()

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("t1", "t2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"t1": {"assoc_id": "t1"}, "t2": {"assoc_id": "t2"}}
    assert "assoc_id" not in audit.context()


def test_rfc5424_header() -> None:
    msg = format_message(facility=10, severity=3, timestamp="2026-01-02T03:04:05.000001Z",
                         hostname="host name", procid=42, msgid="assoc.rejected",
                         structured_data="-", msg='{"a":1}').decode()
    assert msg == '<83>1 2026-01-02T03:04:05.000001Z host_name pacsd 42 assoc.rejected - {"a":1}'


# --------------------------------------------------------------------------- ATNA


@pytest.fixture(scope="module")
def schema() -> etree.RelaxNG:
    return etree.RelaxNG(etree.parse(str(atna.schema_path())))


def _sample(event: Event) -> dict[str, object]:
    rec: dict[str, object] = {"ts": "2026-01-02T03:04:05.123456Z", "event": event.value,
                              "outcome": 0, "seq": 7}
    if event.value.startswith(("assoc", "dicom", "auth")):
        rec.update(assoc_id="ab" * 16, source_ip="192.0.2.7", calling_ae="CT_1",
                   called_ae="PACSD")
    if event is Event.DICOM_STORE:
        rec.update(study_uid="1.2.840.1", instances=3, bytes=1024)
    if event is Event.DICOM_QUERY:
        rec.update(sop_class_uid="1.2.840.10008.5.1.4.1.2.2.1", level="STUDY")
    if event in (Event.AUTH_LOGIN, Event.AUTH_FAILURE, Event.AUTH_LOCKOUT):
        rec.update(user="alice", reason="bad_password")
    if event is Event.ADMIN_AE:
        rec.update(action="add", target_ae="CT_1")
    if event is Event.ADMIN_USER:
        rec.update(action="lock", target_user="bob")
    if event is Event.INTEGRITY_FAILURE:
        rec.update(study_uid="1.2.3", sha256="0" * 64, patient_id="P<1>&\"x\"")
    if event is Event.ASSOC_REJECTED:
        rec.update(gate="certificate", reason="fingerprint mismatch\nwith newline", outcome=8)
    return rec


@pytest.mark.parametrize("event", list(Event))
def test_atna_message_validates_against_schema(event: Event, schema: etree.RelaxNG) -> None:
    xml = atna.render(_sample(event), node_ae="PACSD", hostname="node1.example")
    assert "\n" not in xml
    doc = etree.fromstring(xml.encode())
    assert schema.validate(doc), schema.error_log
    dicom = DICOM_EVENTS[event]
    assert doc.find("EventIdentification/EventID").get("csd-code") == dicom.event_id.code
    assert doc.find("EventIdentification").get("EventActionCode") == dicom.action


def test_atna_content_for_a_store(schema: etree.RelaxNG) -> None:
    doc = etree.fromstring(atna.render(_sample(Event.DICOM_STORE), node_ae="PACSD",
                                       hostname="h").encode())
    peer = doc.findall("ActiveParticipant")[0]
    assert peer.get("UserID") == "CT_1" and peer.get("NetworkAccessPointID") == "192.0.2.7"
    assert peer.find("RoleIDCode").get("csd-code") == "110153"
    po = doc.find("ParticipantObjectIdentification")
    assert po.get("ParticipantObjectID") == "1.2.840.1"
    assert po.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"
    assert po.find("SOPClass").get("NumberOfInstances") == "3"


def test_schema_is_not_vacuous(schema: etree.RelaxNG) -> None:
    good = atna.render(_sample(Event.DICOM_STORE), node_ae="PACSD", hostname="h")
    assert schema.validate(etree.fromstring(good.encode()))
    broken = [
        good.replace('EventOutcomeIndicator="0"', 'EventOutcomeIndicator="3"'),
        good.replace('EventActionCode="C"', 'EventActionCode="X"'),
        good.replace("AuditSourceIdentification", "AuditSource"),
        good.replace('UserIsRequestor="true"', 'UserIsRequestor="maybe"'),
    ]
    no_participant = etree.fromstring(good.encode())
    for ap in no_participant.findall("ActiveParticipant"):
        no_participant.remove(ap)
    for text in broken:
        assert text != good
        assert not schema.validate(etree.fromstring(text.encode()))
    assert not schema.validate(no_participant)


def test_schema_file_ships_in_the_package() -> None:
    p = atna.schema_path()
    assert p.is_file() and p.parent == Path(audit.__file__).parent.parent / "data" / "atna"
