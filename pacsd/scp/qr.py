"""Query/Retrieve SCP: pynetdicom handlers for C-FIND, C-MOVE and C-GET (DESIGN §5, §6).

Thin handlers: gate 5 (`services.permitted`), `store.query` turns the identifier into SQL,
`store.retrieve` selects and verifies the objects, and each request leaves one audit record
(`dicom.query` or `dicom.retrieve`; `integrity.failure` per object that fails its check).

How the sub-operations stream. pynetdicom's C-MOVE/C-GET service class sends what the
handler yields with `send_c_store`; we yield a placeholder (SOP Class/Instance UID only)
per instance and wrap `send_c_store` of the association that carries the C-STOREs, so
that each object is verified and then streamed from its still open file: memory stays
flat, the bytes sent are the bytes stored, and a corrupted object raises before anything
is sent, which pynetdicom counts as a failed sub-operation with its SOP Instance UID in
the Failed SOP Instance UID List. An object whose stored transfer syntax was accepted
for its SOP class (the C-MOVE sub-association proposes exactly those; a C-GET requestor
usually accepts them) is framed into P-DATA-TF PDUs by `scp/sender.py`, encrypted
objects included (they are verified into a private plaintext file first); anything else
(another transfer syntax accepted, unusual File Meta Information) goes through
pynetdicom's own send_c_store (STORE_SEND_CHUNKED_DATASET, set in app.py), converted in
memory when a C-GET requestor accepted only another uncompressed transfer syntax.

Statuses pynetdicom would otherwise fix (a refused C-MOVE is only expressible as A801, a
refused C-GET as "0 sub-operations, success", an unreachable destination as A801) are
corrected on their way out by a per-association filter on `dimse.send_msg`
(`_Replies`), so every refusal carries its own status and an ErrorComment.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pynetdicom import ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import AllStoragePresentationContexts, build_context

from pacsd import audit
from pacsd.auth import aes
from pacsd.scp import find, sender, status
from pacsd.scp.state import AssocState, Services
from pacsd.store import query, retrieve
from pacsd.store.objects import IntegrityError
from pacsd.store.query import PATIENT_ROOT, STUDY_ROOT, QueryError, Selected

log = logging.getLogger("pacsd.qr")

FIND_MODELS = {
    "1.2.840.10008.5.1.4.1.2.1.1": PATIENT_ROOT,
    "1.2.840.10008.5.1.4.1.2.2.1": STUDY_ROOT,
}
MOVE_MODELS = {
    "1.2.840.10008.5.1.4.1.2.1.2": PATIENT_ROOT,
    "1.2.840.10008.5.1.4.1.2.2.2": STUDY_ROOT,
}
GET_MODELS = {
    "1.2.840.10008.5.1.4.1.2.1.3": PATIENT_ROOT,
    "1.2.840.10008.5.1.4.1.2.2.3": STUDY_ROOT,
}
MAX_CONTEXTS = 128  # presentation contexts one association may propose (PS3.8 9.3.2.2)
_UNCOMPRESSED = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"})
_STORE_WARNINGS = frozenset({0x0001, 0xB000, 0xB006, 0xB007})
_SOP_CLASS_TAG, _SOP_INSTANCE_TAG = Tag(0x00080016), Tag(0x00080018)


# ---------------------------------------------------------------------------- wiring
def add_contexts(ae: Any) -> None:
    """Support Patient/Study Root FIND, MOVE, GET; accept SCP/SCU role selection on every
    storage context so a C-GET requestor can take the SCP role for its C-STOREs."""
    for uid in (*FIND_MODELS, *MOVE_MODELS, *GET_MODELS):
        ae.add_supported_context(uid)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES,
                                 scu_role=True, scp_role=True)


def event_handlers(services: Services) -> list[tuple[Any, Callable[..., Any], list[Any]]]:
    s = [services]
    return [
        (evt.EVT_C_FIND, handle_find, s),
        (evt.EVT_C_MOVE, handle_move, s),
        (evt.EVT_C_GET, handle_get, s),
    ]


def _status_ds(code: int, comment: str = "", offending: int | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]
    if offending is not None:
        ds.OffendingElement = [offending]
    return ds


# ---------------------------------------------------------------------------- C-FIND
def handle_find(event: Any, services: Services) -> Iterator[tuple[Any, Dataset | None]]:
    """EVT_C_FIND: yields (Pending, identifier) per match, then the final status."""
    state: AssocState = event.assoc.pacsd_state
    _Replies.of(event.assoc, services.cfg.query.pending_interval_ms / 1000)  # fast pendings
    model = FIND_MODELS.get(str(event.request.AffectedSOPClassUID), STUDY_ROOT)
    fields: dict[str, Any] = {"model": model, **state.audit_context()}
    if not services.permitted(state, "find"):
        services.refuse_request(state, "find")
        _audit_query(fields, audit.Outcome.SERIOUS, reason="find not permitted")
        yield _status_ds(status.REFUSED_NOT_AUTHORIZED, "C-FIND not permitted"), None
        return
    limit = services.cfg.query.max_results
    matches = 0
    audited = False

    def done(outcome: audit.Outcome, **more: Any) -> None:
        nonlocal audited
        audited = True
        _audit_query(fields, outcome, matches=matches, **more)

    # matches leave as pre-encoded PDUs (find.py); other transfer syntaxes as Datasets
    implicit_vr = find.PendingSender.implicit_vr(event.context.transfer_syntax)
    pending: find.PendingSender | None = None
    try:
        q = query.parse(_identifier(event), model)
        fields.update(q.summary())
        retrieve_ae = services.cfg.node.ae_title
        case_insensitive = services.cfg.query.case_insensitive_names
        results: Iterator[Any]
        if implicit_vr is None:
            results = query.find(q, limit=limit, retrieve_ae=retrieve_ae,
                                 case_insensitive=case_insensitive)
        else:
            results = query.find_encoded(q, implicit_vr=implicit_vr, limit=limit,
                                         retrieve_ae=retrieve_ae,
                                         case_insensitive=case_insensitive)
            pending = find.PendingSender(event.assoc, event.context.context_id,
                                        str(event.request.AffectedSOPClassUID),
                                        int(event.request.MessageID))
        match: Any  # a Dataset from find(), encoded bytes from find_encoded()
        for match in results:
            if event.is_cancelled:
                _flush(pending)
                done(audit.Outcome.SUCCESS, cancelled=True)
                yield status.CANCEL, None
                return
            if matches == limit:
                _flush(pending)
                comment = f"more than {limit} matches (query.max_results); refine the query"
                done(audit.Outcome.MINOR, truncated=True)
                yield _status_ds(status.OUT_OF_RESOURCES, comment), None
                return
            matches += 1
            if pending is None:
                yield status.PENDING, match
            else:
                pending.add(match)
        _flush(pending)
        done(audit.Outcome.SUCCESS)
    except QueryError as exc:
        done(audit.Outcome.MINOR, reason=exc.comment)
        yield _status_ds(exc.status, exc.comment, exc.offending), None
        return
    except Exception as exc:  # a database or decoding fault: answer, audit, keep serving
        log.exception("C-FIND failed")
        _flush(pending)
        done(audit.Outcome.MAJOR, reason=type(exc).__name__)
        yield _status_ds(status.UNABLE_TO_PROCESS, "query failed"), None
        return
    finally:
        if not audited:  # the peer aborted or released while matches were pending
            done(audit.Outcome.MINOR, interrupted=True)
    yield status.SUCCESS, None


def _flush(pending: find.PendingSender | None) -> None:
    if pending is not None:
        pending.flush()


def _identifier(event: Any) -> Dataset:
    try:
        ds = event.identifier
    except Exception as exc:
        raise QueryError(status.CANNOT_UNDERSTAND, f"identifier does not decode: {exc}") \
            from None
    if not isinstance(ds, Dataset):
        raise QueryError(status.CANNOT_UNDERSTAND, "no identifier")
    return ds


def _audit_query(fields: dict[str, Any], outcome: audit.Outcome, **more: Any) -> None:
    audit.record(audit.Event("dicom.query"), outcome, **fields, **more)


# ---------------------------------------------------------------------------- replies
class _Replies:
    """Filter on one association's outgoing DIMSE messages: rewrites the final C-MOVE or
    C-GET response of one request when pynetdicom cannot express the status we mean, and
    thins its pending responses to one per `pending_interval` seconds.

    pynetdicom sends a pending response after every sub-operation; PS3.4 C.4.2.1.4/C.4.3.1.4
    makes them optional. The first goes out at once (the requestor sees the retrieve
    started), then one whenever `pending_interval` has passed since the last: a progress
    report a few times a second instead of a message per object, which the requestor
    would otherwise decode hundreds of times a second. The final response is never
    dropped and carries the exact counts."""

    def __init__(self, assoc: Any, pending_interval: float = 0.0) -> None:
        self._send = assoc.dimse.send_msg
        self._dimse = assoc.dimse
        self._lock = threading.Lock()
        self._rewrites: dict[int, Callable[[Any], None]] = {}
        self.pending_interval = pending_interval
        self._last_pending: dict[int, float] = {}  # message ID -> when its last pending went
        assoc.dimse.send_msg = self._filter

    @classmethod
    def of(cls, assoc: Any, pending_interval: float = 0.0) -> _Replies:
        replies = getattr(assoc, "_pacsd_replies", None)
        if replies is None:
            replies = cls(assoc, pending_interval)
            assoc._pacsd_replies = replies
        replies.pending_interval = pending_interval
        return replies

    def _thinned(self, rsp: Any) -> bool:
        """True when this pending response is dropped (one went out < interval ago)."""
        if self.pending_interval <= 0:
            return False
        msg_id = int(rsp.MessageIDBeingRespondedTo)
        now = time.monotonic()
        last = self._last_pending.get(msg_id)
        if last is not None and now - last < self.pending_interval:
            return True
        self._last_pending[msg_id] = now
        return False

    def rewrite(self, msg_id: int, fn: Callable[[Any], None]) -> None:
        with self._lock:
            self._rewrites[msg_id] = fn

    def clear(self, msg_id: int) -> None:
        with self._lock:
            self._rewrites.pop(msg_id, None)

    def _filter(self, primitive: Any, context_id: int) -> None:
        if (type(primitive) is C_FIND and primitive.Status == status.PENDING
                and primitive.Identifier is not None
                and primitive.MessageIDBeingRespondedTo is not None):
            self._pending_find(primitive, context_id)
            return
        if type(primitive) is C_FIND and find.plain_final(primitive):
            self._dimse.dul.send_pdu(find.final_pdata(primitive, context_id))
            return
        if type(primitive) in (C_MOVE, C_GET) and _plain_pending(primitive):
            if not self._thinned(primitive):
                self._pending_retrieve(primitive, context_id)
            return
        if isinstance(primitive, C_MOVE | C_GET) and primitive.Status not in (
                status.PENDING, status.PENDING_WARNING):
            msg_id = int(primitive.MessageIDBeingRespondedTo or 0)
            self._last_pending.pop(msg_id, None)
            with self._lock:
                fn = self._rewrites.pop(msg_id, None)
            if fn is not None:
                fn(primitive)
        self._send(primitive, context_id)


    def _pending_retrieve(self, rsp: Any, context_id: int) -> None:
        """A pending C-MOVE/C-GET-RSP (at most one per pending_interval) encoded by hand:
        same bytes as pynetdicom's, without a pydicom encoder run each time.

        It is queued for the DUL thread without waking it (a pipe write and a thread
        switch per sub-operation on the C-MOVE's critical path): the DUL sends it at its
        next turn, at the latest DUL_IDLE_WAIT (20 ms) later, and always before the
        final response, which is queued behind it and wakes it."""
        cmd = sender.encode_retrieve_pending(
            0x8021 if type(rsp) is C_MOVE else 0x8010, str(rsp.AffectedSOPClassUID),
            int(rsp.MessageIDBeingRespondedTo), int(rsp.NumberOfRemainingSuboperations),
            int(rsp.NumberOfCompletedSuboperations), int(rsp.NumberOfFailedSuboperations),
            int(rsp.NumberOfWarningSuboperations))
        pdata = P_DATA()
        pdata.presentation_data_value_list = [[context_id, b"\x03" + cmd]]  # type: ignore[list-item]
        queue = getattr(self._dimse.dul, "to_provider_queue", None)
        if queue is None or type(rsp) is not C_MOVE:
            # C-GET: its C-STOREs share this DUL and wake it anyway
            self._dimse.dul.send_pdu(pdata)
        else:
            queue.put(pdata)

    def _pending_find(self, rsp: Any, context_id: int) -> None:
        """A pending C-FIND-RSP without pynetdicom's per-message pydicom encoding of the
        command set (most of the cost of each match): same bytes, built by hand."""
        cmd = find.encode_find_pending(str(rsp.AffectedSOPClassUID or ""),
                                       int(rsp.MessageIDBeingRespondedTo))
        data = rsp.Identifier.getvalue()
        dimse = self._dimse
        size = int(dimse.maximum_pdu_size or 0)
        chunk = size - 6 if size > 6 else len(data) or 1
        first = P_DATA()
        # pynetdicom's setter wants [ID, PDV] lists (its annotation says tuples)
        first.presentation_data_value_list = [[context_id, b"\x03" + cmd]]  # type: ignore[list-item]
        dimse.dul.send_pdu(first)
        for offset in range(0, max(len(data), 1), chunk):
            last = offset + chunk >= len(data)
            pdata = P_DATA()
            pdv = [context_id, (b"\x02" if last else b"\x00") + data[offset:offset + chunk]]
            pdata.presentation_data_value_list = [pdv]  # type: ignore[list-item]
            dimse.dul.send_pdu(pdata)


def _plain_pending(rsp: Any) -> bool:
    """A pending C-MOVE/C-GET-RSP as pynetdicom sends one after each sub-operation: the
    four counts, no identifier, no comment (anything else takes pynetdicom's encoder)."""
    return (rsp.Status == status.PENDING and rsp.MessageIDBeingRespondedTo is not None
            and rsp.AffectedSOPClassUID is not None and rsp.Identifier is None
            and rsp.ErrorComment is None
            and None not in (rsp.NumberOfRemainingSuboperations,
                             rsp.NumberOfCompletedSuboperations,
                             rsp.NumberOfFailedSuboperations,
                             rsp.NumberOfWarningSuboperations))


def _refusal(code: int, comment: str) -> Callable[[Any], None]:
    def apply(rsp: Any) -> None:
        rsp.Status = code
        rsp.ErrorComment = comment[:64]
        rsp.Identifier = None
        rsp.NumberOfRemainingSuboperations = None
        rsp.NumberOfCompletedSuboperations = None
        rsp.NumberOfFailedSuboperations = None
        rsp.NumberOfWarningSuboperations = None
    return apply


# ---------------------------------------------------------------------------- retrieve
class _Retrieval:
    """One C-MOVE or C-GET: the selected instances, the sender wrapper and the tally."""

    def __init__(self, services: Services, state: AssocState, service: str) -> None:
        self.services = services
        self.state = state
        self.service = service
        self.tally = retrieve.Tally()
        self.fields: dict[str, Any] = {"service": service, **state.audit_context()}
        self._placeholder = Dataset()
        self._current: Selected | None = None  # what _placeholder stands for now
        self.refused_destination = ""  # set when the destination's certificate is wrong
        self.established = False
        self.finished = False
        objects = getattr(services.store, "objects", None)
        self.tmp_dir = getattr(objects, "tmp", None)
        self.fast = 0  # sub-operations sent by scp/sender.py (the rest by pynetdicom)
        self.ahead = retrieve.VerifyAhead(services.store, [])

    def plan(self, selected: list[Selected]) -> None:
        """The instances to send, in the order the sub-operations will go."""
        self.tally.selected = len(selected)
        self.ahead = retrieve.VerifyAhead(self.services.store, selected,
                                          limit=sender.PREPARE_MAX)

    def placeholder(self, sel: Selected) -> Dataset:
        """The Dataset yielded to pynetdicom for `sel` (SOP Class/Instance UID only).

        One object per retrieval, refilled for every sub-operation (pynetdicom hands it
        to send_c_store at once and keeps only its SOPInstanceUID, for the failed list),
        with raw elements pydicom converts only if read: building a Dataset per instance
        cost the sending thread ~40 us per sub-operation."""
        ds = self._placeholder
        for tag, uid in ((_SOP_CLASS_TAG, sel.sop_class_uid),
                         (_SOP_INSTANCE_TAG, sel.sop_instance_uid)):
            value = uid.encode("ascii")
            if len(value) % 2:
                value += b"\0"
            ds[tag] = RawDataElement(tag, "UI", len(value), value, 0, True, True)
        self._current = sel
        return ds

    def wrap(self, assoc: Any, *, sub_association: bool = False) -> None:
        """Route `assoc.send_c_store` of our placeholders through verify-then-stream.

        Objects are framed for `assoc` ahead (VerifyAhead + sender.Framer); on a C-MOVE
        sub-association (`sub_association`, whose peer only answers) the sending thread
        also writes and reads the socket itself (sender's SocketLease)."""
        original = assoc.send_c_store
        self.ahead.framer = sender.Framer(assoc)

        def send_c_store(dataset: Any, *args: Any, **kwargs: Any) -> Any:
            sel, self._current = self._current, None
            if dataset is not self._placeholder or sel is None:
                return original(dataset, *args, **kwargs)
            try:
                return self._send(assoc, original, sel, *args, direct=sub_association,
                                  **kwargs)
            finally:
                if sub_association:
                    _note_abort(assoc)
                    sender.resume(assoc)

        assoc.send_c_store = send_c_store

    def _send(self, assoc: Any, original: Callable[..., Any], sel: Selected, *args: Any,
              direct: bool = False, **kwargs: Any) -> Any:
        if self.refused_destination:
            self.tally.done(sel, "failure")
            raise PermissionError(self.refused_destination)
        try:
            with contextlib.closing(self.ahead.open(sel)) as f:
                try:
                    # stored transfer syntax accepted: framed ahead, or from the file
                    rsp = sender.send_c_store(assoc, f, direct=direct,
                                              **_store_args(*args, **kwargs))
                    self.fast += 1
                except sender.Unsupported:
                    if isinstance(f, sender.Prepared):  # rare: a file for pynetdicom
                        with contextlib.closing(
                                self.services.store.open_verified(sel.sha256)) as g:
                            rsp = self._send_slow(original, g, sel, *args, **kwargs)
                    else:
                        rsp = self._send_slow(original, f, sel, *args, **kwargs)
        except IntegrityError as exc:
            self.tally.done(sel, "failure")
            self.tally.integrity_failures += 1
            audit.record(audit.Event("integrity.failure"), audit.Outcome.MAJOR,
                         sop_instance_uid=sel.sop_instance_uid, study_uid=sel.study_uid,
                         sha256=sel.sha256, actual_sha256=exc.actual or "",
                         reason="missing" if exc.actual is None else "checksum mismatch",
                         during=self.service, **self.state.audit_context())
            log.error("integrity failure on %s: not sent", sel.sha256)
            raise
        except Exception:
            self.tally.done(sel, "failure")
            raise
        code = getattr(rsp, "Status", None)
        if code == status.SUCCESS:
            self.tally.done(sel, "success")
        elif code in _STORE_WARNINGS:
            self.tally.done(sel, "warning")
        else:
            self.tally.done(sel, "failure")
        return rsp

    def _send_slow(self, original: Callable[..., Any], f: Any, sel: Selected, *args: Any,
                   **kwargs: Any) -> Any:
        """pynetdicom's send_c_store, for what the fast path does not take."""
        with retrieve.path_of(f, self.tmp_dir) as path:
            try:
                return original(path, *args, **kwargs)
            except ValueError as exc:
                # a C-GET requestor that accepted another uncompressed transfer
                # syntax: convert this one (decoded in memory, from the verified file)
                if "No presentation context" not in str(exc) \
                        or sel.transfer_syntax not in _UNCOMPRESSED:
                    raise
                return original(dcmread(path), *args, **kwargs)

    def finish(self, outcome: audit.Outcome | None = None, **more: Any) -> None:
        """The one dicom.retrieve record of this request (later calls do nothing)."""
        if self.finished:
            return
        self.finished = True
        self.ahead.close()
        t = self.tally
        if outcome is None:
            if t.failed == 0 and t.remaining == 0:
                outcome = audit.Outcome.SUCCESS
            elif t.failed == t.selected:
                outcome = audit.Outcome.SERIOUS
            else:
                outcome = audit.Outcome.MINOR
        audit.record(audit.Event("dicom.retrieve"), outcome, **self.fields,
                     study_uids=sorted(t.studies)[:100], instances=t.selected,
                     completed=t.completed, warning=t.warning, failed=t.failed,
                     remaining=t.remaining, bytes=t.bytes,
                     integrity_failures=t.integrity_failures, **more)


def _store_args(msg_id: int = 1, priority: int = 2, originator_aet: str | None = None,
                originator_id: int | None = None) -> dict[str, Any]:
    """send_c_store's arguments after the dataset, by name (pynetdicom's signature)."""
    return {"msg_id": int(msg_id), "priority": int(priority),
            "originator_aet": None if originator_aet is None else str(originator_aet),
            "originator_id": None if originator_id is None else int(originator_id)}


def _note_abort(assoc: Any) -> None:
    """Mark a sub-association the destination aborted as no longer established at once.

    Its own thread notices the A-ABORT a little later; meanwhile pynetdicom would treat it
    as live and, after the last sub-operation, wait out the ACSE timeout for an
    A-RELEASE-RP that can never come (the requester's C-MOVE hangs that long).
    """
    with contextlib.suppress(Exception):
        if assoc.is_established and (assoc.is_aborted or assoc.acse.is_aborted()
                                     or not assoc.dul.is_alive()):
            assoc.is_established = False


def _select_for(event: Any, models: dict[str, str], services: Services, r: _Retrieval, what: str,
                ) -> tuple[list[Selected], tuple[int, str] | None]:
    """Select a C-MOVE/C-GET's instances; a bad identifier or a failure becomes a refusal."""
    try:
        q, selected = _select(event, models, services.cfg.query.max_suboperations)
    except QueryError as exc:
        return [], (exc.status, exc.comment)
    except Exception as exc:  # answered with a status, never raised into pynetdicom
        log.exception("%s selection failed", what)
        return [], (status.UNABLE_TO_PROCESS, f"retrieve failed: {type(exc).__name__}")
    r.fields.update(q.summary())
    return selected, None


def _select(event: Any, models: dict[str, str], limit: int = retrieve.MAX_SUBOPERATIONS,
            ) -> tuple[query.Query, list[Selected]]:
    model = models.get(str(event.request.AffectedSOPClassUID), STUDY_ROOT)
    q = query.parse(_identifier(event), model)
    return q, retrieve.select(q, limit=limit)


def _subops(r: _Retrieval, event: Any, selected: list[Selected]
            ) -> Iterator[tuple[Any, Dataset | None]]:
    """Yield one placeholder per instance, stopping on C-CANCEL. A request abandoned by
    pynetdicom (peer aborted or released) is still audited when the generator closes."""
    try:
        for sel in selected:
            if event.is_cancelled:
                r.finish(audit.Outcome.MINOR, cancelled=True)
                yield status.CANCEL, None
                return
            yield status.PENDING, r.placeholder(sel)
        r.finish()
    finally:
        r.finish(audit.Outcome.MINOR, interrupted=True)


def handle_get(event: Any, services: Services) -> Iterator[Any]:
    """EVT_C_GET: yields the number of sub-operations, then one placeholder per instance."""
    state: AssocState = event.assoc.pacsd_state
    r = _Retrieval(services, state, "get")
    replies = _Replies.of(event.assoc, services.cfg.query.pending_interval_ms / 1000)
    msg_id = int(event.request.MessageID)
    refusal: tuple[int, str] | None = None
    selected: list[Selected] = []
    if not services.permitted(state, "get"):
        services.refuse_request(state, "get")
        refusal = (status.REFUSED_NOT_AUTHORIZED, "C-GET not permitted")
    else:
        selected, refusal = _select_for(event, GET_MODELS, services, r, "C-GET")
    if refusal is not None:
        replies.rewrite(msg_id, _refusal(*refusal))
        r.finish(audit.Outcome.SERIOUS if refusal[0] == status.REFUSED_NOT_AUTHORIZED
                 else audit.Outcome.MINOR, reason=refusal[1])
        yield 0
        return
    r.plan(selected)
    r.wrap(event.assoc)
    yield len(selected)
    if not selected:
        r.finish()
        return
    yield from _subops(r, event, selected)


def _destination(state: AssocState, title: str) -> tuple[aes.Peer | None, str]:
    """The registered destination `title` if the requesting AE may move to it."""
    peer = aes.get(title) if title else None
    if peer is None or not peer.enabled or not peer.dest:
        return None, f"destination {title[:16]!r} not registered"
    if state.peer is None or title not in state.peer.move_to:
        return None, f"destination {title[:16]!r} not allowed for this AE"
    return peer, ""


def _host_port(dest: str) -> tuple[str, int]:
    host, _, port = dest.rpartition(":")
    return host.strip("[]"), int(port)


def _contexts(selected: list[Selected]) -> list[Any]:
    """Exact (SOP class, transfer syntax) contexts: objects are sent as stored."""
    pairs = sorted({(s.sop_class_uid, s.transfer_syntax) for s in selected})
    if len(pairs) <= MAX_CONTEXTS:
        return [build_context(c, [t]) for c, t in pairs]
    by_class: dict[str, list[str]] = {}
    for c, t in pairs:
        by_class.setdefault(c, []).append(t)
    return [build_context(c, ts) for c, ts in sorted(by_class.items())[:MAX_CONTEXTS]]


def _on_destination_accepted(event: Any, r: _Retrieval, dest: aes.Peer) -> None:
    """Requestor side of the sub-association: check the destination's certificate."""
    from pacsd.tls import peer_fingerprint

    r.established = True
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:  # Nagle would hold each C-STORE's last PDU for a delayed ACK
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    seen = peer_fingerprint(sock) if sock is not None else None
    if seen != dest.cert_sha256:
        r.refused_destination = f"destination {dest.title} presented another certificate"
        audit.record(audit.Event("assoc.rejected"), audit.Outcome.SERIOUS, gate="move-dest",
                     reason=r.refused_destination, destination=dest.title,
                     **r.state.audit_context())
    r.wrap(event.assoc, sub_association=True)


def handle_move(event: Any, services: Services) -> Iterator[Any]:
    """EVT_C_MOVE: yields the destination, the number of sub-operations, then one
    placeholder per instance (sent over our own TLS sub-association)."""
    state: AssocState = event.assoc.pacsd_state
    r = _Retrieval(services, state, "move")
    replies = _Replies.of(event.assoc, services.cfg.query.pending_interval_ms / 1000)
    msg_id = int(event.request.MessageID)
    title = str(event.request.MoveDestination or "").strip()
    r.fields["destination"] = title
    refusal: tuple[int, str] | None = None
    selected: list[Selected] = []
    dest: aes.Peer | None = None
    if not services.permitted(state, "move"):
        services.refuse_request(state, "move")
        refusal = (status.REFUSED_NOT_AUTHORIZED, "C-MOVE not permitted")
    else:
        dest, why = _destination(state, title)
        if dest is None:
            refusal = (status.MOVE_DESTINATION_UNKNOWN, why)
        elif services.client_tls is None:
            refusal = (status.UNABLE_TO_PROCESS, "no client TLS context for C-MOVE")
        else:
            selected, refusal = _select_for(event, MOVE_MODELS, services, r, "C-MOVE")
    if refusal is not None or dest is None:
        code, comment = refusal or (status.MOVE_DESTINATION_UNKNOWN, "no destination")
        replies.rewrite(msg_id, _refusal(code, comment))
        r.finish(audit.Outcome.SERIOUS, reason=comment)
        yield None, None
        return
    try:
        host, port = _host_port(dest.dest)
    except ValueError:
        replies.rewrite(msg_id, _refusal(status.MOVE_DESTINATION_UNKNOWN,
                                         f"destination {title[:16]} has no valid address"))
        r.finish(audit.Outcome.SERIOUS, reason="destination address invalid")
        yield None, None
        return
    r.plan(selected)
    kwargs = {
        "tls_args": (services.client_tls, None),
        "contexts": _contexts(selected) if selected else None,
        "evt_handlers": [(evt.EVT_ACCEPTED, _on_destination_accepted, [r, dest])],
    }
    yield host, port, kwargs
    # pynetdicom now opens the sub-association; if the destination refuses it, it answers
    # A801 and never resumes us: say instead what happened, with exact counts.
    n = len(selected)

    def unreachable(rsp: Any) -> None:
        if rsp.Status == status.MOVE_DESTINATION_UNKNOWN and not r.established:
            rsp.Status = status.SUBOPS_FAILED
            rsp.ErrorComment = f"destination {title[:16]} refused the association"
            rsp.NumberOfRemainingSuboperations = None
            rsp.NumberOfCompletedSuboperations = 0
            rsp.NumberOfWarningSuboperations = 0
            rsp.NumberOfFailedSuboperations = n
            r.tally.failed = n
            r.finish(audit.Outcome.SERIOUS, reason="destination refused the association")

    if n:
        replies.rewrite(msg_id, unreachable)
    yield n
    replies.clear(msg_id)  # the sub-association is up
    if not selected:
        r.finish()
        return
    yield from _subops(r, event, selected)
