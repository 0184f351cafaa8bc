"""scp/commitment.py with stand-in events and associations (no socket): the N-ACTION
handler's statuses and audit, the report dataset, sending on the requesting association
(reactor paused, peer messages handed back, release noticed), and one delivery attempt."""

from __future__ import annotations

import io
import queue
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom.dimse_primitives import C_ECHO, N_EVENT_REPORT
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu_primitives import A_RELEASE

from pacsd import audit
from pacsd import config as configmod
from pacsd.auth.aes import Peer
from pacsd.scp import commitment as scp
from pacsd.scp.state import AssocState
from pacsd.store import commitment as store
from pacsd.store.index import open_index_db

CT = "1.2.840.10008.5.1.4.1.1.2"


def _cfg(tmp_path: Path, extra: str = "") -> configmod.Config:
    p = tmp_path / "pacsd.toml"
    p.write_text("[storage]\nroot = 'data/objects'\nindex = 'data/index.sqlite'\n" + extra)
    return configmod.load(p)


def _state(permits: set[str]) -> AssocState:
    s = AssocState(assoc_id="a" * 32, source_ip="127.0.0.1", source_port=1, cert_sha256="",
                   calling_ae="MOD", called_ae="PACSD")
    s.peer = Peer(title="MOD", cert_sha256="0" * 64, cert_subject="", cert_not_after="",
                  hosts=(), permits=frozenset(permits), require_user=False, dest="",
                  move_to=(), enabled=True)
    return s


class FakeServices:
    def __init__(self, cfg: configmod.Config) -> None:
        self.cfg = cfg
        self.refused: list[str] = []

    def permitted(self, state: AssocState, service: str) -> bool:
        return state.peer is not None and service in state.peer.permits

    def refuse_request(self, state: AssocState, service: str) -> None:
        self.refused.append(service)


class FakeCommitments:
    def __init__(self, cfg: configmod.Config, fail: bool = False) -> None:
        self.services = FakeServices(cfg)
        self.cfg = cfg.commitment
        self.fail = fail
        self.accepted: list[tuple[str, list[store.Item]]] = []

    def accept(self, state: AssocState, assoc: Any, txn: str, items: list[store.Item]
               ) -> tuple[int, bool]:
        if self.fail:
            raise OSError("disk gone")
        self.accepted.append((txn, items))
        return 7, False


def _info(txn: str | None = "1.2.3", refs: list[tuple[str, str]] | None = None) -> Dataset:
    ds = Dataset()
    if txn is not None:
        ds.TransactionUID = txn
    if refs is not None:
        items = []
        for c, i in refs:
            d = Dataset()
            d.ReferencedSOPClassUID = c
            d.ReferencedSOPInstanceUID = i
            items.append(d)
        ds.ReferencedSOPSequence = Sequence(items)
    return ds


def _event(info: Dataset | None, permits: set[str], *, action: int = 1,
           sop_class: str = scp.SOP_CLASS, sop_instance: str = scp.SOP_INSTANCE) -> Any:
    raw = encode(info, True, True) if info is not None else None
    request = SimpleNamespace(RequestedSOPClassUID=sop_class,
                              RequestedSOPInstanceUID=sop_instance, ActionTypeID=action,
                              ActionInformation=io.BytesIO(raw) if raw is not None else None)
    ev = SimpleNamespace(request=request, assoc=SimpleNamespace(pacsd_state=_state(permits)))
    ev.action_information = decode(io.BytesIO(raw), True, True) if raw is not None else None
    return ev


def _code(rsp: Any) -> int:
    return int(rsp.Status) if isinstance(rsp, Dataset) else int(rsp)


def test_n_action_success_is_recorded_then_answered(tmp_path: Path) -> None:
    c = FakeCommitments(_cfg(tmp_path))
    with audit.capture() as records:
        rsp, reply = scp.handle_n_action(_event(_info(refs=[(CT, "1.2.3.4")]), {"commit"}), c)
    assert (_code(rsp), reply) == (0, None)
    assert c.accepted == [("1.2.3", [store.Item(CT, "1.2.3.4")])]
    [rec] = records
    assert (rec["event"], rec["action"], rec["outcome"], rec["instances"]) == (
        "dicom.commit", "request", 0, 1)
    assert rec["transaction_uid"] == "1.2.3" and rec["calling_ae"] == "MOD"


def test_n_action_without_permission(tmp_path: Path) -> None:
    c = FakeCommitments(_cfg(tmp_path))
    with audit.capture() as records:
        rsp, _ = scp.handle_n_action(_event(_info(refs=[(CT, "1.2")]), {"store"}), c)
    assert _code(rsp) == 0x0124 and c.services.refused == ["commit"] and not c.accepted
    assert records[-1]["outcome"] == 8


ONE = {"refs": [(CT, "1.2")]}


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns on the bad UIDs we build
@pytest.mark.parametrize(("info_args", "event_args", "code"), [
    ({"refs": None}, {}, 0x0115),
    ({"txn": None, "refs": [(CT, "1.2")]}, {}, 0x0115),
    ({"refs": [(CT, "1.2.x")]}, {}, 0x0115),
    ({"refs": [(CT, "1." + "2" * 70)]}, {}, 0x0115),
    ({"refs": []}, {}, 0x0115),
    (None, {}, 0x0115),
    (ONE, {"action": 2}, 0x0123),
    (ONE, {"sop_instance": "1.2.3"}, 0x0117),
    (ONE, {"sop_class": CT}, 0x0118),
    ({"refs": [(CT, f"1.2.{k}") for k in range(11)]}, {}, 0x0213),
])
def test_n_action_refusals(tmp_path: Path, info_args: dict[str, Any] | None,
                           event_args: dict[str, Any], code: int) -> None:
    c = FakeCommitments(_cfg(tmp_path, "[commitment]\nmax_items = 10\n"))
    info = _info(**info_args) if info_args is not None else None
    with audit.capture() as records:
        rsp, _ = scp.handle_n_action(_event(info, {"commit"}, **event_args), c)
    assert _code(rsp) == code and not c.accepted
    assert rsp.ErrorComment
    assert records[-1]["outcome"] == 4 and records[-1]["reason"]


def test_oversized_n_action_refused_before_decoding(tmp_path: Path) -> None:
    c = FakeCommitments(_cfg(tmp_path, "[commitment]\nmax_items = 10\n"))
    ev = _event(_info(refs=[(CT, "1.2")]), {"commit"})
    ev.request.ActionInformation = io.BytesIO(b"\0" * (10 * scp.MAX_ITEM_BYTES
                                                        + scp.MAX_HEADER_BYTES + 1))
    ev.action_information = None  # were it decoded, this would answer 0115
    rsp, _ = scp.handle_n_action(ev, c)
    assert _code(rsp) == 0x0213


def test_n_action_not_recorded_is_not_success(tmp_path: Path) -> None:
    c = FakeCommitments(_cfg(tmp_path), fail=True)
    with audit.capture() as records:
        rsp, _ = scp.handle_n_action(_event(_info(refs=[(CT, "1.2")]), {"commit"}), c)
    assert _code(rsp) == 0x0110
    assert records[-1]["outcome"] == 12


def _request(items: tuple[store.Item, ...] = (store.Item(CT, "1.1"),), pk: int = 1
             ) -> store.Request:
    return store.Request(pk=pk, transaction_uid="1.2.3", calling_ae="MOD",
                         source_ip="127.0.0.1", assoc_id="ab", username="", duplicate=False,
                         items=items, result=None, state=store.PENDING, attempts=0,
                         deadline=0.0, last_error="")


def test_event_information() -> None:
    res = store.Result(committed=[store.Item(CT, "1.1")],
                       failed=[(store.Item(CT, "1.2"), 0x0112)])
    ds = scp.event_information(_request(), res, "PACSD")
    assert ds.TransactionUID == "1.2.3" and ds.RetrieveAETitle == "PACSD"
    assert [d.ReferencedSOPInstanceUID for d in ds.ReferencedSOPSequence] == ["1.1"]
    assert [(d.ReferencedSOPInstanceUID, d.FailureReason) for d in ds.FailedSOPSequence] == [
        ("1.2", 0x0112)]
    ok = scp.event_information(_request(), store.Result(committed=[store.Item(CT, "1.1")]),
                               "PACSD")
    assert "FailedSOPSequence" not in ok


# ---------------------------------------------------------------------------- same assoc
class FakeAssoc:
    """The parts of an acceptor Association that send_on_association touches."""

    def __init__(self, *, answer: int | None = 0, release: bool = False,
                 interleave: list[Any] = ()) -> None:  # type: ignore[assignment]
        self.is_established = True
        self._is_paused = True
        self._reactor_checkpoint = threading.Event()
        self._reactor_checkpoint.set()
        self.sent: list[Any] = []
        self.answer = answer
        self.interleave = list(interleave)
        msgs: queue.Queue[Any] = queue.Queue()
        self.dimse = SimpleNamespace(msg_queue=msgs, send_msg=self._send)
        pending = A_RELEASE() if release else None
        self.dul = SimpleNamespace(peek_next_pdu=lambda: pending)
        self.acse = SimpleNamespace(is_aborted=lambda: False)
        self.checkpoint_was_clear = False

    def _get_valid_context(self, *_: Any) -> Any:
        return SimpleNamespace(context_id=3, transfer_syntax=[ImplicitVRLittleEndian])

    def _send(self, primitive: Any, context_id: int) -> None:
        self.checkpoint_was_clear = not self._reactor_checkpoint.is_set()
        self.sent.append((primitive, context_id))
        for m in self.interleave:  # the peer sends something else first
            self.dimse.msg_queue.put((3, m))
        if self.answer is not None:
            rsp = N_EVENT_REPORT()
            rsp.MessageIDBeingRespondedTo = primitive.MessageID
            rsp.AffectedSOPClassUID = scp.SOP_CLASS
            rsp.AffectedSOPInstanceUID = scp.SOP_INSTANCE
            rsp.EventTypeID = primitive.EventTypeID
            rsp.Status = self.answer
            self.dimse.msg_queue.put((3, rsp))


def _ds() -> Dataset:
    return scp.event_information(_request(), store.Result(committed=[store.Item(CT, "1.1")]),
                                 "PACSD")


def test_send_on_association_pauses_reactor_and_hands_back_peer_messages() -> None:
    echo = C_ECHO()
    echo.MessageID = 9
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    a = FakeAssoc(interleave=[echo])
    assert scp.send_on_association(a, _ds(), 1, 5, timeout=2) == (True, "")
    [(rq, cx)] = a.sent
    assert (rq.MessageID, rq.EventTypeID, cx) == (5, 1, 3)
    assert str(rq.AffectedSOPInstanceUID) == scp.SOP_INSTANCE
    info = decode(rq.EventInformation, True, True)
    assert info.TransactionUID == "1.2.3"
    assert a.checkpoint_was_clear and a._reactor_checkpoint.is_set()  # paused, then resumed
    assert a.dimse.msg_queue.get_nowait() == (3, echo)  # back for the reactor


def test_send_on_association_failure_status_and_no_answer() -> None:
    ok, why = scp.send_on_association(FakeAssoc(answer=0x0110), _ds(), 1, 5, timeout=2)
    assert not ok and "0x0110" in why
    ok, why = scp.send_on_association(FakeAssoc(answer=None), _ds(), 1, 5, timeout=0.2)
    assert not ok and "no N-EVENT-REPORT response" in why


def test_send_on_association_gives_up_when_the_peer_releases() -> None:
    a = FakeAssoc(release=True)
    ok, why = scp.send_on_association(a, _ds(), 1, 5, timeout=2)
    assert not ok and "closed" in why and a.sent == []
    a = FakeAssoc()
    a.is_established = False
    assert scp.send_on_association(a, _ds(), 1, 5, timeout=2)[0] is False


# ---------------------------------------------------------------------------- delivery
class Reader:
    def open_verified(self, sha: str) -> Any:
        return io.BytesIO(b"")


@pytest.fixture
def commitments(tmp_path: Path) -> Any:
    cfg = _cfg(tmp_path, "[commitment]\nretry_interval = 1\nretry_deadline = 60\n")
    db = open_index_db(cfg)
    services = SimpleNamespace(cfg=cfg, store=SimpleNamespace(db=db, open_verified=Reader()
                                                              .open_verified),
                               client_tls=None)
    c = scp.Commitments(services)  # type: ignore[arg-type]  # not started: no thread
    yield c
    db.close()


def test_deliver_on_the_requesting_association(commitments: Any) -> None:
    a = FakeAssoc()
    with audit.capture() as records:
        pk, _ = commitments.accept(_state({"commit"}), a, "1.2.3", [store.Item(CT, "9.9")])
        assert commitments.deliver(pk)
    req = store.load(commitments.db, pk)
    assert req.state == store.DELIVERED and req.result.failed == [(store.Item(CT, "9.9"),
                                                                    0x0112)]
    rq = a.sent[0][0]
    assert rq.EventTypeID == 2
    rec = [r for r in records if r.get("action") == "report"]
    assert rec and (rec[0]["route"], rec[0]["failed"], rec[0]["failure_reasons"]) == (
        "same", 1, ["0112:1"])


def test_deliver_falls_back_and_schedules_a_retry(commitments: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    a = FakeAssoc(release=True)  # the modality released at once
    monkeypatch.setattr(commitments, "_send_new",
                        lambda req, ds, et: (False, "127.0.0.1:9 refused", "127.0.0.1:9"))
    with audit.capture() as records:
        pk, _ = commitments.accept(_state({"commit"}), a, "1.2.3", [store.Item(CT, "9.9")])
        assert not commitments.deliver(pk)
    req = store.load(commitments.db, pk)
    assert req.state == store.PENDING and req.attempts == 1
    assert "same association" in req.last_error and "refused" in req.last_error
    assert req.result is not None  # checked once, kept for the retries
    rec = [r for r in records if r.get("action") == "delivery_failed"]
    assert rec and rec[0]["outcome"] == 4 and rec[0]["attempts"] == 1


def test_policy_new_never_uses_the_requesting_association(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    cfg = _cfg(tmp_path, "[commitment]\nnew_association_for = ['MOD']\n")
    db = open_index_db(cfg)
    try:
        services = SimpleNamespace(cfg=cfg, store=SimpleNamespace(
            db=db, open_verified=Reader().open_verified), client_tls=None)
        c = scp.Commitments(services)  # type: ignore[arg-type]
        sent: list[int] = []
        monkeypatch.setattr(c, "_send_new", lambda req, ds, et: (sent.append(et) or True, "",
                                                                 "127.0.0.1:9"))
        a = FakeAssoc()
        with audit.capture():
            pk, _ = c.accept(_state({"commit"}), a, "1.2.3", [store.Item(CT, "9.9")])
            assert c.deliver(pk)
        assert a.sent == [] and sent == [2]
    finally:
        db.close()
