"""Storage Commitment Push Model SCP (issue 8): N-ACTION in, N-EVENT-REPORT out.

The N-ACTION handler is thin: gate 5 (`commit`), decode and validate the Action
Information (store/commitment.parse_items), write the request durably
(store/commitment.record) and only then answer Success. Everything after that runs in
this worker's `Commitments` dispatcher, never in pynetdicom's association thread:

- a dispatcher thread takes the request just received (and, every few seconds, claims
  due requests from the shared index: retries, and requests a killed worker left);
- a delivery thread per request checks the instances once (result kept in the row),
  then sends the N-EVENT-REPORT: on the requesting association if the policy allows it
  and the modality still holds it open (after the N-ACTION response has gone out: the
  association's reactor is paused while we wait for the N-EVENT-REPORT-RSP), otherwise
  on a new TLS association to the AE's registered `--dest`, proposing the SCP role for
  Storage Commitment (PS3.4 J.3.3, role selection) and presenting our certificate; the
  destination must present the certificate registered for that AE;
- an undelivered report is retried with doubling back-off until `retry_deadline`, then
  audited as failed.

Audit (`dicom.commit`, field `action`): `request` (received, refused or malformed),
`report` (sent: committed and failed counts, route), `delivery_failed` (one attempt),
`expired` (given up). Objects that fail their SHA-256 check raise `integrity.failure`.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import AE, build_role, evt
from pynetdicom.dimse_primitives import N_EVENT_REPORT
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import A_RELEASE

from pacsd import audit
from pacsd.auth import aes
from pacsd.config import parse_host_port
from pacsd.scp import status
from pacsd.scp.state import AssocState, Services
from pacsd.store import commitment as store_commitment
from pacsd.store.commitment import Item, Request, RequestError, Result

log = logging.getLogger("pacsd.commitment")

SOP_CLASS = "1.2.840.10008.1.20.1"  # Storage Commitment Push Model SOP Class
SOP_INSTANCE = "1.2.840.10008.1.20.1.1"  # its well-known SOP Instance
ACTION_REQUEST = 1  # Action Type ID: Request Storage Commitment

NO_SUCH_SOP_CLASS = 0x0118
INVALID_OBJECT_INSTANCE = 0x0117
NO_SUCH_ACTION = 0x0123

# Encoded size bounds for the cap check before decoding: an item is at most 8 (item tag)
# + 2 x (8 + 64) bytes (two UIDs); slack for a Storage Media File-Set ID and the like.
MAX_ITEM_BYTES = 256
MAX_HEADER_BYTES = 8192
MAX_DELIVERIES = 4  # concurrent deliveries per worker
# Delivered and expired requests are kept this long (for 0131 duplicate Transaction UID
# checks and for inspection), then deleted; looked at hourly.
KEEP_FINISHED = 30 * 86_400.0
PURGE_EVERY = 3_600.0
POLL_MAX = 5.0  # seconds between looks at the shared table for due requests
POLL_MIN = 0.5
PAUSE_WAIT = 5.0  # seconds to wait for an association's reactor to pause


# ---------------------------------------------------------------------------- wiring
def add_contexts(ae: Any) -> None:
    """Support Storage Commitment Push Model, accepting SCU/SCP role selection."""
    ae.add_supported_context(SOP_CLASS, scu_role=True, scp_role=True)


def event_handlers(services: Services) -> list[tuple[Any, Callable[..., Any], list[Any]]]:
    """The N-ACTION handler; also starts this worker's commitment dispatcher."""
    commitments = Commitments(services)
    commitments.start()
    return [(evt.EVT_N_ACTION, handle_n_action, [commitments])]


# ---------------------------------------------------------------------------- N-ACTION
def handle_n_action(event: Any, commitments: Commitments) -> tuple[Dataset | int, None]:
    """EVT_N_ACTION: record the request durably, then answer; the report follows."""
    services = commitments.services
    state: AssocState = event.assoc.pacsd_state
    req = event.request
    fields: dict[str, Any] = {"action": "request", **state.audit_context()}
    if not services.permitted(state, "commit"):
        services.refuse_request(state, "commit")
        _audit(audit.Outcome.SERIOUS, fields, reason="commit not permitted")
        return (status.dataset(status.REFUSED_NOT_AUTHORIZED, "storage commitment not permitted"),
                None)
    refusal = _check_request(req)
    if refusal is None:
        try:
            txn, items = _parse(event, commitments.cfg.max_items)
        except RequestError as exc:
            refusal = (exc.status, exc.comment)
    if refusal is not None:
        _audit(audit.Outcome.MINOR, fields, reason=refusal[1])
        return status.dataset(*refusal), None
    fields["transaction_uid"] = txn
    try:
        pk, duplicate = commitments.accept(state, event.assoc, txn, items)
    except Exception as exc:  # the request is not durable: say so, never Success
        log.exception("storage commitment request not recorded")
        _audit(audit.Outcome.MAJOR, fields, instances=len(items),
               reason=f"not recorded: {type(exc).__name__}")
        return status.dataset(status.PROCESSING_FAILURE, "request could not be recorded"), None
    _audit(audit.Outcome.SUCCESS, fields, instances=len(items), duplicate=duplicate,
           request_id=pk)
    return status.SUCCESS, None


def _check_request(req: Any) -> tuple[int, str] | None:
    if str(req.RequestedSOPClassUID or "") != SOP_CLASS:
        return NO_SUCH_SOP_CLASS, "not the Storage Commitment Push Model SOP Class"
    if str(req.RequestedSOPInstanceUID or "") != SOP_INSTANCE:
        return INVALID_OBJECT_INSTANCE, f"SOP Instance must be {SOP_INSTANCE}"
    if req.ActionTypeID != ACTION_REQUEST:
        return NO_SUCH_ACTION, "Action Type ID must be 1"
    return None


def _parse(event: Any, max_items: int) -> tuple[str, list[Item]]:
    """Transaction UID and items of the Action Information; raises RequestError.

    A request too large to hold `max_items` is refused before it is decoded: pydicom
    decodes a whole sequence at once, ~30 s for 100,000 items on a busy machine.
    """
    raw = getattr(event.request, "ActionInformation", None)
    size = raw.getbuffer().nbytes if isinstance(raw, BytesIO) else 0
    if size > max_items * MAX_ITEM_BYTES + MAX_HEADER_BYTES:
        raise RequestError(store_commitment.RESOURCE_LIMITATION,
                           f"more than {max_items} referenced instances (commitment.max_items)")
    try:
        ds = event.action_information
        if not isinstance(ds, Dataset):
            raise RequestError(store_commitment.INVALID_ARGUMENT_VALUE, "no Action Information")
        txn = ds.get("TransactionUID")
        seq = ds.get("ReferencedSOPSequence")
        pairs = None if seq is None else (
            (item.get("ReferencedSOPClassUID"), item.get("ReferencedSOPInstanceUID"))
            for item in seq)
        return store_commitment.parse_items(txn, pairs, max_items=max_items)
    except RequestError:
        raise
    except Exception as exc:  # a dataset that does not decode
        raise RequestError(store_commitment.INVALID_ARGUMENT_VALUE,
                           f"Action Information does not decode: {type(exc).__name__}") \
            from None


def _audit(outcome: audit.Outcome, fields: dict[str, Any], **more: Any) -> None:
    audit.record(audit.Event.DICOM_COMMIT, outcome, **{**fields, **more})


# ---------------------------------------------------------------------------- report
def event_information(req: Request, result: Result, retrieve_ae: str) -> Dataset:
    """The N-EVENT-REPORT Event Information (PS3.4 J.3.3.1.1)."""
    ds = Dataset()
    ds.TransactionUID = req.transaction_uid
    ds.RetrieveAETitle = retrieve_ae
    if result.committed:
        ds.ReferencedSOPSequence = Sequence([_ref(i) for i in result.committed])
    if result.failed:
        failed = []
        for item, reason in result.failed:
            d = _ref(item)
            d.FailureReason = reason
            failed.append(d)
        ds.FailedSOPSequence = Sequence(failed)
    return ds


def _ref(item: Item) -> Dataset:
    d = Dataset()
    d.ReferencedSOPClassUID = item.sop_class_uid
    d.ReferencedSOPInstanceUID = item.sop_instance_uid
    return d


def _release_pending(assoc: Any) -> bool:
    """The peer asked to release (without consuming the request, which the reactor does)."""
    primitive = assoc.dul.peek_next_pdu()
    return isinstance(primitive, A_RELEASE) and primitive.result is None


def _wait_paused(assoc: Any, deadline: float) -> bool:
    """Wait until the association's reactor sits at its checkpoint (seen twice)."""
    seen = 0
    while time.monotonic() < deadline:
        if not assoc.is_established:
            return False
        if assoc._is_paused:
            seen += 1
            if seen >= 2:
                return True
        else:
            seen = 0
        time.sleep(0.002)
    return False


def send_on_association(assoc: Any, ds: Dataset, event_type: int, msg_id: int,
                        timeout: float) -> tuple[bool, str]:
    """Send the N-EVENT-REPORT on the modality's own association (we are its acceptor).

    Pauses the association's reactor (as pynetdicom's send_* methods do) so the response
    reaches us; any other message the peer sends meanwhile is handed back to the reactor.
    Gives up, without aborting, when the peer releases or aborts. Returns (sent, why not).
    """
    if not assoc.is_established or _release_pending(assoc):
        return False, "the modality closed the association"
    try:
        cx = assoc._get_valid_context(SOP_CLASS, "", None)
    except ValueError:
        return False, "no Storage Commitment context on the association"
    ts = cx.transfer_syntax[0]
    payload = encode(ds, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
    if payload is None:
        return False, "event information does not encode"
    msgs = assoc.dimse.msg_queue
    held: list[Any] = []
    assoc._reactor_checkpoint.clear()
    try:
        if not _wait_paused(assoc, time.monotonic() + PAUSE_WAIT):
            return False, "the association is busy or closed"
        if not assoc.is_established or _release_pending(assoc):
            return False, "the modality closed the association"
        rq = N_EVENT_REPORT()
        rq.MessageID = msg_id
        rq.AffectedSOPClassUID = SOP_CLASS
        rq.AffectedSOPInstanceUID = SOP_INSTANCE
        rq.EventTypeID = event_type
        rq.EventInformation = BytesIO(payload)
        assoc.dimse.send_msg(rq, cx.context_id)
        end = time.monotonic() + timeout
        while True:
            try:
                cx_id, msg = msgs.get(timeout=0.05)
            except queue.Empty:
                if (not assoc.is_established or assoc.acse.is_aborted()
                        or _release_pending(assoc)):
                    return False, "the association ended before the report was answered"
                if time.monotonic() > end:
                    return False, "no N-EVENT-REPORT response (dimse_timeout)"
                continue
            if (isinstance(msg, N_EVENT_REPORT) and msg.is_valid_response
                    and msg.MessageIDBeingRespondedTo == msg_id):
                return _accepted(int(msg.Status or 0))  # valid response: Status is set
            held.append((cx_id, msg))
    finally:
        if held:  # the peer's own requests: back to the reactor, in order
            rest = []
            with contextlib.suppress(queue.Empty):
                while True:
                    rest.append(msgs.get_nowait())
            for item in (*held, *rest):
                msgs.put(item)
        assoc._reactor_checkpoint.set()


def _accepted(code: int) -> tuple[bool, str]:
    if code == status.SUCCESS or 0xB000 <= code <= 0xBFFF or code == 0x0001:
        return True, ""
    return False, f"the modality answered status 0x{code:04X}"


# ---------------------------------------------------------------------------- dispatcher
class Commitments:
    """This worker's commitment requests: intake, dispatcher thread, deliveries."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.cfg = services.cfg.commitment
        self.db = services.store.db
        self.owner = store_commitment.owner_token()
        node = services.cfg.node
        # a claim outlives one delivery attempt: check, same association, new association
        self.lease = float(2 * (node.acse_timeout + node.dimse_timeout) + 60)
        self._live: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        self._intake: queue.Queue[int] = queue.Queue()
        self._inflight: set[int] = set()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_DELIVERIES)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="commitment", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._intake.put(0)

    # -- intake (association thread)
    def accept(self, state: AssocState, assoc: Any, txn: str, items: list[Item]
               ) -> tuple[int, bool]:
        """Record a request durably (claimed by this worker) and queue it; (pk, duplicate).
        Raises peewee.DatabaseError when it could not be recorded."""
        now = time.time()
        pk, duplicate = store_commitment.record(
            self.db, transaction_uid=txn, items=items, calling_ae=state.calling_ae,
            source_ip=state.source_ip, assoc_id=state.assoc_id, username=state.user or "",
            now=now, deadline=now + self.cfg.retry_deadline, owner=self.owner,
            lease=self.lease)
        if self._same_allowed(state.calling_ae):
            self._live[pk] = assoc
        self._intake.put(pk)
        return pk, duplicate

    def _same_allowed(self, title: str) -> bool:
        return self.cfg.report_on == "same-or-new" and title not in self.cfg.new_association_for

    # -- dispatcher thread
    def _run(self) -> None:
        next_purge = 0.0
        while not self._stop.is_set():
            wait = POLL_MAX
            try:
                if time.time() >= next_purge:
                    next_purge = time.time() + PURGE_EVERY
                    store_commitment.purge_finished(self.db, time.time() - KEEP_FINISHED)
                for pk in store_commitment.claim_due(self.db, owner=self.owner,
                                                     now=time.time(), lease=self.lease):
                    self._submit(pk)
                due = store_commitment.next_due(self.db)
                if due is not None:
                    wait = min(POLL_MAX, max(POLL_MIN, due - time.time()))
            except Exception:
                log.exception("commitment dispatcher: cannot read the request table")
            try:
                pk = self._intake.get(timeout=wait)
            except queue.Empty:
                continue
            if pk:
                self._submit(pk)

    def _submit(self, pk: int) -> None:
        with self._lock:
            if pk in self._inflight:
                return
            self._inflight.add(pk)
        self._slots.acquire()
        threading.Thread(target=self._deliver_guarded, args=(pk,), name=f"commit-{pk}",
                         daemon=True).start()

    def _deliver_guarded(self, pk: int) -> None:
        try:
            self.deliver(pk)
        except Exception:
            log.exception("commitment %d: delivery failed unexpectedly", pk)
            with contextlib.suppress(Exception):
                store_commitment.release(self.db, pk, self.owner)
        finally:
            with self._lock:
                self._inflight.discard(pk)
            self._slots.release()

    # -- one delivery attempt
    def deliver(self, pk: int) -> bool:
        """Check (once) and send the report of request `pk`; True when delivered."""
        req = store_commitment.load(self.db, pk)
        if req is None or req.state != store_commitment.PENDING:
            return False
        result = req.result
        if result is None:
            result = store_commitment.check(self.db, self.services.store, req.items,
                                            duplicate=req.duplicate)
            store_commitment.save_result(self.db, pk, result)
            store_commitment.renew(self.db, pk, self.owner, time.time() + self.lease)
            self._audit_integrity(req, result)
        ds = event_information(req, result, self.services.cfg.node.ae_title)
        errors: list[str] = []
        assoc = self._live.get(pk)  # kept for retries while the modality holds it open
        if assoc is not None and self._same_allowed(req.calling_ae):
            ok, why = send_on_association(assoc, ds, result.event_type, _msg_id(pk),
                                          float(self.services.cfg.node.dimse_timeout))
            if ok:
                return self._delivered(req, result, route="same")
            errors.append(f"same association: {why}")
        ok, why, dest = self._send_new(req, ds, result.event_type)
        if ok:
            return self._delivered(req, result, route="new", destination=dest)
        errors.append(why)
        self._failed(req, "; ".join(errors))
        return False

    def _send_new(self, req: Request, ds: Dataset, event_type: int) -> tuple[bool, str, str]:
        """Open a TLS association to the AE's --dest and send; (sent, why not, dest)."""
        peer = aes.get(req.calling_ae)
        if peer is None or not peer.enabled:
            return False, f"AE {req.calling_ae} is no longer registered or enabled", ""
        if not peer.dest:
            return False, f"AE {req.calling_ae} has no --dest for a new association", ""
        if self.services.client_tls is None:
            return False, "no client TLS context", peer.dest
        try:
            host, port = parse_host_port(peer.dest, "dest")
        except Exception:
            return False, f"--dest {peer.dest!r} is not HOST:PORT", peer.dest
        node = self.services.cfg.node
        ae = AE(ae_title=node.ae_title)
        ae.acse_timeout = node.acse_timeout
        ae.dimse_timeout = node.dimse_timeout
        ae.network_timeout = node.network_timeout
        ae.connection_timeout = node.acse_timeout
        ae.add_requested_context(SOP_CLASS)
        role = build_role(SOP_CLASS, scu_role=False, scp_role=True)
        try:
            assoc = ae.associate(host, port, ae_title=peer.title, ext_neg=[role],
                                 tls_args=(self.services.client_tls, None))  # type: ignore[arg-type]  # no server_hostname: peers are checked by fingerprint
        except Exception as exc:
            return False, f"cannot connect to {peer.dest}: {type(exc).__name__}", peer.dest
        if not assoc.is_established:
            return False, f"{peer.dest} refused or did not answer the association", peer.dest
        try:
            if _peer_fingerprint(assoc) != peer.cert_sha256:
                why = f"{peer.dest} presented a certificate not registered for {peer.title}"
                audit.record(audit.Event.ASSOC_REJECTED, audit.Outcome.SERIOUS,
                             gate="commit-dest", reason=why, destination=peer.title,
                             **_context(req))
                assoc.abort()
                return False, why, peer.dest
            cx = next((c for c in assoc.accepted_contexts if c.abstract_syntax == SOP_CLASS),
                      None)
            if cx is None or not cx.as_scp:
                assoc.release()
                return False, f"{peer.dest} did not accept our SCP role", peer.dest
            rsp, _ = assoc.send_n_event_report(ds, event_type, SOP_CLASS, SOP_INSTANCE,
                                               msg_id=_msg_id(req.pk))
            code = getattr(rsp, "Status", None)
            if code is None:
                return False, f"{peer.dest} did not answer the report", peer.dest
            ok, why = _accepted(int(code))
            return ok, why, peer.dest
        finally:
            if assoc.is_established:
                assoc.release()

    # -- outcomes
    def _delivered(self, req: Request, result: Result, **route: Any) -> bool:
        store_commitment.mark_delivered(self.db, req.pk)
        self._live.pop(req.pk, None)
        reasons = Counter(f"{r:04X}" for _, r in result.failed)
        audit.record(audit.Event.DICOM_COMMIT,
                     audit.Outcome.SUCCESS if not result.failed else audit.Outcome.MINOR,
                     action="report", request_id=req.pk, event_type=result.event_type,
                     instances=len(req.items), committed=len(result.committed),
                     failed=len(result.failed), attempts=req.attempts + 1,
                     failure_reasons=[f"{k}:{v}" for k, v in sorted(reasons.items())],
                     study_uids=sorted(result.studies)[:100], **route, **_context(req))
        return True

    def _failed(self, req: Request, why: str) -> None:
        attempts, expired = store_commitment.mark_attempt_failed(
            self.db, req.pk, error=why, now=time.time(),
            interval=self.cfg.retry_interval, max_interval=self.cfg.retry_max_interval)
        log.warning("commitment %d (%s): report not delivered (attempt %d): %s",
                    req.pk, req.calling_ae, attempts, why)
        if expired:
            self._live.pop(req.pk, None)
        audit.record(audit.Event.DICOM_COMMIT,
                     audit.Outcome.SERIOUS if expired else audit.Outcome.MINOR,
                     action="expired" if expired else "delivery_failed", request_id=req.pk,
                     attempts=attempts, reason=why[:500], **_context(req))

    def _audit_integrity(self, req: Request, result: Result) -> None:
        for p in result.integrity:
            audit.record(audit.Event.INTEGRITY_FAILURE, audit.Outcome.MAJOR,
                         sop_instance_uid=p.sop_instance_uid, study_uid=p.study_uid,
                         sha256=p.sha256, actual_sha256=p.actual_sha256, reason=p.reason,
                         during="commit", **_context(req))
            log.error("integrity failure on %s: not committed", p.sha256)


def _context(req: Request) -> dict[str, Any]:
    return req.audit_fields()


def _msg_id(pk: int) -> int:
    return pk % 65535 + 1


def _peer_fingerprint(assoc: Any) -> str | None:
    from pacsd.tls import peer_fingerprint

    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    return peer_fingerprint(sock) if sock is not None else None
