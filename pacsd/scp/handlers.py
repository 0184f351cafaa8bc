"""Thin pynetdicom event handlers: decode, call store/auth, map to a DIMSE status, audit."""

from __future__ import annotations

import logging
from typing import Any

from pydicom.dataset import Dataset

from pacsd import audit
from pacsd.scp import status
from pacsd.scp.state import AssocState, Services

log = logging.getLogger("pacsd.handlers")


def handle_accepted(event: Any, services: Services) -> None:
    state: AssocState = event.assoc.pacsd_state
    state.accepted = True
    from pacsd.scp import faststore

    faststore.attach(event.assoc, services, state)
    audit.record(audit.Event("assoc.accepted"), audit.Outcome.SUCCESS,
                 contexts=len(event.assoc.accepted_contexts), **state.audit_context())


def handle_released(event: Any, services: Services) -> None:
    state: AssocState = event.assoc.pacsd_state
    services.flush_store_tally(state)
    audit.record(audit.Event("assoc.released"), audit.Outcome.SUCCESS, **state.audit_context())


def handle_aborted(event: Any, services: Services) -> None:
    state: AssocState = event.assoc.pacsd_state
    services.flush_store_tally(state)
    if state.accepted:
        audit.record(audit.Event("assoc.aborted"), audit.Outcome.MINOR, **state.audit_context())


def handle_echo(event: Any, services: Services) -> int:
    state: AssocState = event.assoc.pacsd_state
    if not services.permitted(state, "echo"):
        services.refuse_request(state, "echo")
        return status.REFUSED_NOT_AUTHORIZED
    return status.SUCCESS


def handle_store(event: Any, services: Services) -> Dataset | int:
    """EVT_C_STORE: the dataset already sits in a SpoolFile under the object root.

    Most C-STOREs never get here: scp/faststore.py takes them from the socket to
    `store_spool` in the receiving thread. This is the path for the rest (a command set
    split over PDUs, extended negotiation, ...)."""
    state: AssocState = event.assoc.pacsd_state
    req = event.request
    spool = req._dataset_file
    if spool is None:  # chunked receive is always on; a C-STORE without a dataset
        services.tally_store(state, "", False, 0, "no dataset")
        return status.dataset(status.CANNOT_UNDERSTAND, "C-STORE without a dataset")
    code, comment = store_spool(services, state, spool,
                                sop_class_uid=str(req.AffectedSOPClassUID or ""),
                                sop_instance_uid=str(req.AffectedSOPInstanceUID or ""),
                                transfer_syntax=str(event.context.transfer_syntax))
    return status.dataset(code, comment) if comment else code


def store_spool(services: Services, state: AssocState, spool: Any, *, sop_class_uid: str,
                sop_instance_uid: str, transfer_syntax: str) -> tuple[int, str]:
    """Gate 5, then ingest one received dataset and tally it for the dicom.store record.

    Returns (DIMSE status, error comment for the response or ""); the spool is consumed.
    """
    from pacsd.store.ingest import Origin

    if not services.permitted(state, "store"):
        spool.abort()
        services.refuse_request(state, "store")
        return status.REFUSED_NOT_AUTHORIZED, ""
    result = services.store.ingest(
        spool,
        sop_class_uid=sop_class_uid,
        sop_instance_uid=sop_instance_uid,
        transfer_syntax=transfer_syntax,
        origin=Origin(calling_ae=state.calling_ae, source_ip=state.source_ip,
                      username=state.user or "", assoc_id=state.assoc_id),
    )
    ok = result.status == status.SUCCESS
    services.tally_store(state, result.study_uid, ok, result.size, result.message)
    if not ok:
        log.info("store refused from %s: %s", state.calling_ae, result.message)
        return result.status, result.message[:64]
    return result.status, ""
