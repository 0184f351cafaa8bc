"""C-MOVE's fast path against a corrupted object.

On a C-MOVE sub-association the next object is read, framed into its PDUs and verified
ahead (store/retrieve.VerifyAhead, scp/sender.py) while the current one is on the wire:
a corrupted object found that way must still never be sent, must be counted as failed
and listed, and must raise integrity.failure; the others arrive intact.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelMove,
)

from tests.conftest import Node
from tests.integration.test_qr import QRNode, StoreSCP, ident

STUDY = "1.2.826.0.1.3680043.9.7.1"


@pytest.fixture
def qr_node(node: Node, tmp_path: Path) -> QRNode:
    return QRNode(node, tmp_path)


def test_cmove_corrupted_object_not_sent_counted_and_audited(qr_node: QRNode,
                                                             tmp_path: Path) -> None:
    qr = qr_node
    bad, good = f"{STUDY}.1.2", f"{STUDY}.1.1"  # the second is the one verified ahead
    victim = next(f for f in qr.node.objects.rglob("*.dcm")
                  if pydicom.dcmread(f).SOPInstanceUID == bad)
    raw = bytearray(victim.read_bytes())
    raw[-10] ^= 0xFF
    victim.write_bytes(bytes(raw))
    assert hashlib.sha256(raw).hexdigest() != victim.stem
    scp = StoreSCP(qr, tmp_path / "dest")
    a = qr.assoc()
    final: Any = None
    identifier: Any = None
    try:
        for st, found in a.send_c_move(ident("STUDY", StudyInstanceUID=STUDY), "DEST",
                                       StudyRootQueryRetrieveInformationModelMove):
            if st.Status not in (0xFF00, 0xFF01):
                final, identifier = st, found
        assert final is not None and final.Status == 0xB000, final
        assert (final.NumberOfCompletedSuboperations,
                final.NumberOfFailedSuboperations) == (1, 1)
        assert identifier is not None and identifier.FailedSOPInstanceUIDList == bad
        assert a.send_c_echo().Status == 0  # the requester's association is unharmed
    finally:
        a.release()
        scp.close()
    got = [pydicom.dcmread(f) for f in scp.files()]
    assert [d.SOPInstanceUID for d in got] == [good]
    stored = next(pydicom.dcmread(f) for f in qr.files[:2]
                  if pydicom.dcmread(f).SOPInstanceUID == good)
    assert got[0] == stored  # the good one, intact
    rec = qr.node.audit.wait_for(lambda r: r.get("event") == "integrity.failure")
    assert rec and rec[0]["sop_instance_uid"] == bad and rec[0]["during"] == "move"
    rec = qr.node.audit.wait_for(lambda r: r.get("event") == "dicom.retrieve")
    assert rec and (rec[0]["completed"], rec[0]["failed"],
                    rec[0]["integrity_failures"]) == (1, 1, 1)
