"""Render an audit record as a DICOM audit message (PS3.15 A.5 XML) for `format = "atna"`.

The message validates against pacsd/data/atna/dicom-audit-message.rng, our RELAX NG
transcription of the schema in PS3.15 A.5.1. Elements come in the schema's order.
Well-known fields become participants and participant objects; the rest (gate,
reason, assoc_id, ...) go into EventOutcomeDescription as `key=value` pairs.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pacsd.audit.events import CONTEXT_FIELDS, DICOM_EVENTS, Code, Event

SCHEMA_NAME = "dicom-audit-message.rng"

SOURCE_ROLE = Code("110153", "Source Role ID")
DESTINATION_ROLE = Code("110152", "Destination Role ID")
APPLICATION_ROLE = Code("110150", "Application")
STUDY_UID = Code("110180", "Study Instance UID")
SOP_CLASS_UID = Code("110181", "SOP Class UID")
NODE_ID = Code("110182", "Node ID")
PATIENT_NUMBER = Code("2", "Patient Number", "RFC-3881")
USER_IDENTIFIER = Code("11", "User Identifier", "RFC-3881")
APPLICATION_SERVER = Code("4", "Application Server Process", "RFC-3881")

# fields rendered as structure, not as outcome-description text
_MAPPED = frozenset({
    "ts", "event", "outcome", "seq", "chain", "study_uid", "study_uids", "instances",
    "sop_class_uid", "patient_id", "target_ae", "target_user",
    "source_ip", "calling_ae", "called_ae", "user",
})
_CTRL = re.compile(r"[\x00-\x1f\x7f]")


def schema_path() -> Path:
    """The packaged RELAX NG schema of PS3.15 A.5.1."""
    return Path(__file__).resolve().parent.parent / "data" / "atna" / SCHEMA_NAME


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return _CTRL.sub(" ", str(value))


def _coded(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(parent, tag, {
        "csd-code": code.code, "codeSystemName": code.scheme,
        "displayName": code.meaning, "originalText": code.meaning,
    })


def _participant(root: ET.Element, user_id: str, *, requestor: bool, alt: str = "",
                 nap: str = "", nap_type: str = "", role: Code | None = None) -> None:
    attrs = {"UserID": _text(user_id), "UserIsRequestor": "true" if requestor else "false"}
    if alt:
        attrs["AlternativeUserID"] = _text(alt)
    if nap:
        attrs["NetworkAccessPointID"] = _text(nap)
        attrs["NetworkAccessPointTypeCode"] = nap_type
    ap = ET.SubElement(root, "ActiveParticipant", attrs)
    if role is not None:
        _coded(ap, "RoleIDCode", role)


def _object(root: ET.Element, object_id: str, id_type: Code, type_code: str, role: str,
            name: str = "") -> ET.Element:
    po = ET.SubElement(root, "ParticipantObjectIdentification", {
        "ParticipantObjectID": _text(object_id) or "-",
        "ParticipantObjectTypeCode": type_code,
        "ParticipantObjectTypeCodeRole": role,
    })
    _coded(po, "ParticipantObjectIDTypeCode", id_type)
    if name:
        ET.SubElement(po, "ParticipantObjectName").text = _text(name)
    return po


def render(record: Mapping[str, Any], *, node_ae: str, hostname: str) -> str:
    """The record as one line of PS3.15 A.5 XML (no newlines, no XML declaration)."""
    event = Event(record["event"])
    dicom = DICOM_EVENTS[event]
    root = ET.Element("AuditMessage")
    ev = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": dicom.action,
        "EventDateTime": str(record["ts"]),
        "EventOutcomeIndicator": str(int(record["outcome"])),
    })
    _coded(ev, "EventID", dicom.event_id)
    if dicom.type_code is not None:
        _coded(ev, "EventTypeCode", dicom.type_code)
    rest = [f"{k}={_text(v)}" for k, v in sorted(record.items()) if k not in _MAPPED]
    ET.SubElement(ev, "EventOutcomeDescription").text = " ".join(
        [f"pacsd {event.value}", *rest])

    peer_ae = record.get("calling_ae")
    source_ip = record.get("source_ip")
    our_ae = record.get("called_ae") or node_ae
    has_peer = bool(peer_ae or source_ip)
    stores = event is Event.DICOM_STORE
    sends = event is Event.DICOM_RETRIEVE
    if has_peer:
        _participant(root, str(peer_ae or source_ip), requestor=True,
                     alt=f"AETITLES={peer_ae}" if peer_ae else "",
                     nap=str(source_ip or ""), nap_type="2",
                     role=SOURCE_ROLE if stores else DESTINATION_ROLE if sends else None)
    if record.get("user"):
        _participant(root, str(record["user"]), requestor=True)
    _participant(root, str(our_ae), requestor=not has_peer and not record.get("user"),
                 alt=f"AETITLES={our_ae}", nap=hostname, nap_type="1",
                 role=DESTINATION_ROLE if stores else SOURCE_ROLE if sends else APPLICATION_ROLE)

    src = ET.SubElement(root, "AuditSourceIdentification",
                        {"AuditSourceID": _text(node_ae), "AuditEnterpriseSiteID": hostname})
    _coded(src, "AuditSourceTypeCode", APPLICATION_SERVER)

    studies = record.get("study_uids") or ([record["study_uid"]] if record.get("study_uid")
                                           else [])
    for uid in studies:
        po = _object(root, str(uid), STUDY_UID, "2", "3")
        if record.get("sop_class_uid") or record.get("instances") is not None:
            ET.SubElement(po, "SOPClass", {
                "UID": _text(record.get("sop_class_uid") or "-"),
                "NumberOfInstances": str(int(record.get("instances") or 0)),
            })
    if not studies and record.get("sop_class_uid"):
        _object(root, str(record["sop_class_uid"]), SOP_CLASS_UID, "2", "3")
    if record.get("patient_id"):
        _object(root, str(record["patient_id"]), PATIENT_NUMBER, "1", "1")
    if record.get("target_ae"):
        _object(root, str(record["target_ae"]), NODE_ID, "2", "13", name=str(record["target_ae"]))
    if record.get("target_user"):
        _object(root, str(record["target_user"]), USER_IDENTIFIER, "1", "11",
                name=str(record["target_user"]))
    return ET.tostring(root, encoding="unicode", short_empty_elements=True)


__all__ = ["CONTEXT_FIELDS", "SCHEMA_NAME", "render", "schema_path"]
