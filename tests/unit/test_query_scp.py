"""The Q/R handlers driven with stand-in events (no socket): C-CANCEL, the result cap,
gate 5 and the reply filter that states refusals pynetdicom cannot express."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import C_GET

from pacsd import audit
from pacsd import config as configmod
from pacsd.auth.aes import Peer
from pacsd.scp import find, frames, qr
from pacsd.scp.state import AssocState
from pacsd.store import index
from tests.unit.test_query import fill

STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_GET = "1.2.840.10008.5.1.4.1.2.2.3"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
BIG_ENDIAN = "1.2.840.10008.1.2.2"


def _cfg(tmp_path: Path, extra: str = "") -> configmod.Config:
    p = tmp_path / "pacsd.toml"
    p.write_text("[storage]\nroot = 'data/objects'\nindex = 'data/index.sqlite'\n" + extra)
    return configmod.load(p)


class FakeServices:
    def __init__(self, cfg: configmod.Config) -> None:
        self.cfg = cfg
        self.store = SimpleNamespace()
        self.client_tls = None
        self.refused: list[str] = []

    def permitted(self, state: AssocState, service: str) -> bool:
        return state.peer is not None and service in state.peer.permits

    def refuse_request(self, state: AssocState, service: str) -> None:
        self.refused.append(service)


class FakeDul:
    def __init__(self) -> None:
        self.pdus: list[Any] = []  # primitives queued for the DUL thread
        self.socket: Any = None

    def send_pdu(self, primitive: Any) -> None:
        self.pdus.append(primitive)

    def _send(self, pdu: Any) -> None:  # the DUL thread's write, which find.py wraps
        raise AssertionError("not called in these tests")


class FakeDimse:
    def __init__(self, max_pdu: int = 16384) -> None:
        self.sent: list[Any] = []
        self.dul = FakeDul()
        self.maximum_pdu_size = max_pdu

    def send_msg(self, primitive: Any, context_id: int) -> None:
        self.sent.append(primitive)


class FakeEvent:
    """What the handlers read from a pynetdicom Event; cancels after `cancel_after` reads."""

    def __init__(self, identifier: Dataset, sop_class: str, permits: set[str],
                 cancel_after: int | None = None, transfer_syntax: str = IMPLICIT_LE,
                 max_pdu: int = 16384) -> None:
        peer = Peer(title="WS", cert_sha256="0" * 64, cert_subject="", cert_not_after="",
                    hosts=(), permits=frozenset(permits), require_user=False, dest="",
                    move_to=(), enabled=True)
        state = AssocState(assoc_id="a" * 32, source_ip="127.0.0.1", source_port=1,
                           cert_sha256="0" * 64, calling_ae="WS", called_ae="PACSD", peer=peer)
        self.assoc = SimpleNamespace(pacsd_state=state, dimse=FakeDimse(max_pdu),
                                     send_c_store=lambda *a, **kw: None)
        self.request = SimpleNamespace(AffectedSOPClassUID=sop_class, MessageID=7)
        self.context = SimpleNamespace(context_id=3, transfer_syntax=transfer_syntax)
        self.identifier = identifier
        self._reads = 0
        self._cancel_after = cancel_after

    @property
    def is_cancelled(self) -> bool:
        self._reads += 1
        return self._cancel_after is not None and self._reads > self._cancel_after


@pytest.fixture
def cfg(tmp_path: Path) -> Any:
    c = _cfg(tmp_path, "[query]\nmax_results = 4\n")
    db = index.open_index_db(c)
    fill()
    yield c
    db.close()


def study_query(**keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def framed(ev: FakeEvent) -> list[tuple[int, Dataset]]:
    """(Status, Identifier) of the pending responses the handler framed itself, decoded
    from the P-DATA-TF bytes it queued on the DUL (checking the framing on the way)."""
    from io import BytesIO

    from pynetdicom.dsutils import decode

    out: list[tuple[int, Dataset]] = []
    implicit = ev.context.transfer_syntax == IMPLICIT_LE
    command, data = b"", b""
    for primitive in ev.assoc.dimse.dul.pdus:
        [(cx, raw)] = primitive.presentation_data_value_list
        assert cx == ev.context.context_id and type(raw) is frames.Frames
        raw = bytes(raw.data)
        while raw:
            assert raw[0] == 0x04
            length = int.from_bytes(raw[2:6], "big")
            assert length <= (ev.assoc.dimse.maximum_pdu_size or length)
            body, raw = raw[6:6 + length], raw[6 + length:]
            while body:
                n = int.from_bytes(body[:4], "big")
                assert body[4] == cx
                control, value, body = body[5], body[6:4 + n], body[4 + n:]
                if control & 1:
                    command += value
                else:
                    data += value
                    if control & 2:
                        cmd = decode(BytesIO(command), True, True)
                        assert cmd.MessageIDBeingRespondedTo == 7 and cmd.CommandField == 0x8020
                        out.append((int(cmd.Status),
                                    decode(BytesIO(data), implicit, True)))
                        command, data = b"", b""
    assert not command and not data
    return out


def statuses(results: list[Any], ev: FakeEvent | None = None) -> list[int]:
    """Pending statuses framed by the handler (when `ev` is given), then what it yielded."""
    pending = [st for st, _ in framed(ev)] if ev is not None else []
    return pending + [r[0] if isinstance(r[0], int) else int(r[0].Status) for r in results]


def test_find_cancel_stops_the_query(cfg: Any) -> None:
    ev = FakeEvent(study_query(PatientName="DOE*"), STUDY_FIND, {"find"}, cancel_after=1)
    with audit.capture() as records:
        out = list(qr.handle_find(ev, FakeServices(cfg)))  # type: ignore[arg-type]
    assert statuses(out, ev) == [0xFF00, 0xFE00]
    assert records[-1]["event"] == "dicom.query" and records[-1]["cancelled"] is True
    assert records[-1]["matches"] == 1


def test_find_cap_is_stated_in_the_final_status(cfg: Any) -> None:
    ev = FakeEvent(study_query(), STUDY_FIND, {"find"})
    with audit.capture() as records:
        out = list(qr.handle_find(ev, FakeServices(cfg)))  # type: ignore[arg-type]
    assert statuses(out, ev) == [0xFF00] * 4 + [0xA700]
    assert "max_results" in out[-1][0].ErrorComment
    assert records[-1]["truncated"] is True and records[-1]["matches"] == 4


def test_find_under_the_cap_succeeds_and_audits_keys_not_values(cfg: Any) -> None:
    ev = FakeEvent(study_query(PatientName="DOE^JANE"), STUDY_FIND, {"find"})
    with audit.capture() as records:
        out = list(qr.handle_find(ev, FakeServices(cfg)))  # type: ignore[arg-type]
    assert statuses(out, ev) == [0xFF00, 0xFF00, 0x0000]
    assert sorted(str(ds.StudyInstanceUID) for _, ds in framed(ev)) == ["1.2.1", "1.2.2"]
    rec = records[-1]
    assert rec["outcome"] == 0 and rec["query_keys"] == ["PatientName"]
    assert "DOE^JANE" not in str(rec)


@pytest.mark.parametrize("transfer_syntax", [IMPLICIT_LE, EXPLICIT_LE])
@pytest.mark.parametrize("max_pdu", [16384, 64, 0])
def test_find_frames_matches_itself(cfg: Any, transfer_syntax: str, max_pdu: int) -> None:
    """Matches leave as P-DATA-TF PDUs built here, in the request's transfer syntax and
    within the peer's maximum PDU length (fragmented when small; 0 = unlimited), one
    DUL hand-off for all of them; only the final status goes through pynetdicom."""
    ev = FakeEvent(study_query(PatientName="DOE^JANE", PatientID="", StudyDate=""),
                   STUDY_FIND, {"find"}, transfer_syntax=transfer_syntax, max_pdu=max_pdu)
    with audit.capture():
        out = list(qr.handle_find(ev, FakeServices(cfg)))  # type: ignore[arg-type]
    assert statuses(out, ev) == [0xFF00, 0xFF00, 0x0000]
    assert len(ev.assoc.dimse.dul.pdus) == 1
    got = sorted((str(ds.StudyInstanceUID), str(ds.PatientID), str(ds.StudyDate))
                 for _, ds in framed(ev))
    assert got == [("1.2.1", "P1", "20240101"), ("1.2.2", "P1", "20240102")]
    assert all(ds.QueryRetrieveLevel == "STUDY" for _, ds in framed(ev))


def test_find_in_another_syntax_yields_datasets(cfg: Any) -> None:
    ev = FakeEvent(study_query(PatientName="DOE^JANE"), STUDY_FIND, {"find"},
                   transfer_syntax=BIG_ENDIAN)
    with audit.capture():
        out = list(qr.handle_find(ev, FakeServices(cfg)))  # type: ignore[arg-type]
    assert statuses(out) == [0xFF00, 0xFF00, 0x0000] and not ev.assoc.dimse.dul.pdus
    assert sorted(str(ds.StudyInstanceUID) for _, ds in out[:2]) == ["1.2.1", "1.2.2"]


def test_frames_are_written_as_they_are_by_the_dul() -> None:
    from pynetdicom.pdu import P_DATA_TF
    from pynetdicom.pdu_primitives import P_DATA

    written: list[bytes] = []
    originals: list[Any] = []
    events: list[str] = []
    done: list[int] = []
    sock = SimpleNamespace(sendall=written.append)
    dul = SimpleNamespace(socket=SimpleNamespace(socket=sock), _send=originals.append,
                          event_queue=SimpleNamespace(put=events.append))
    frames.install(dul)
    frames.install(dul)  # once per association: a second call changes nothing
    other = P_DATA()
    other.presentation_data_value_list = [[1, b"\x03cmd"]]
    dul._send(P_DATA_TF(frames.pdata(1, frames.Frames(b"\x04\x00pdus", lambda: done.append(1)))))
    dul._send(P_DATA_TF(other))
    assert written == [b"\x04\x00pdus"] and len(originals) == 1 and done == [1]
    assert not events

    def broken(data: bytes) -> None:
        raise ConnectionResetError("peer gone")

    sock.sendall = broken  # a closed transport: Evt17, and the buffer is still given back
    dul._send(P_DATA_TF(frames.pdata(1, frames.Frames(b"\x04\x00more", lambda: done.append(2)))))
    assert events == ["Evt17"] and done == [1, 2]


def test_find_not_permitted(cfg: Any) -> None:
    svc = FakeServices(cfg)
    ev = FakeEvent(study_query(), STUDY_FIND, {"echo", "store"})
    with audit.capture() as records:
        out = list(qr.handle_find(ev, svc))  # type: ignore[arg-type]
    assert statuses(out) == [0x0124]
    assert svc.refused == ["find"] and records[-1]["outcome"] == 8


def test_find_bad_identifier_answers_with_its_status(cfg: Any) -> None:
    ds = Dataset()
    ds.PatientID = "P1"
    ev = FakeEvent(ds, STUDY_FIND, {"find"})
    with audit.capture():
        out = list(qr.handle_find(ev, FakeServices(cfg)))  # type: ignore[arg-type]
    assert statuses(out) == [0xA900]
    assert out[0][0].OffendingElement == 0x00080052


def test_get_refusal_is_rewritten_on_the_wire(cfg: Any) -> None:
    ev = FakeEvent(study_query(StudyInstanceUID="1.2.1"), STUDY_GET, {"find"})
    with audit.capture() as records:
        gen = qr.handle_get(ev, FakeServices(cfg))  # type: ignore[arg-type]
        assert next(gen) == 0  # pynetdicom then answers "success, 0 sub-operations"
    rsp = C_GET()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.Status = 0x0000
    rsp.NumberOfCompletedSuboperations = 0
    ev.assoc.dimse.send_msg(rsp, 1)
    assert ev.assoc.dimse.sent == [rsp]
    assert rsp.Status == 0x0124 and rsp.NumberOfCompletedSuboperations is None
    assert records[-1]["event"] == "dicom.retrieve" and records[-1]["outcome"] == 8


def test_get_cancel_reports_remaining(cfg: Any) -> None:
    ev = FakeEvent(study_query(StudyInstanceUID="1.2.1"), STUDY_GET, {"get"}, cancel_after=2)
    with audit.capture() as records:
        gen = qr.handle_get(ev, FakeServices(cfg))  # type: ignore[arg-type]
        assert next(gen) == 4
        out, uids = [], []
        for item in gen:  # the handler refills one placeholder Dataset per sub-operation:
            out.append(item)  # read each UID when it is yielded, as pynetdicom sends it
            if len(out) <= 2:
                uids.append(str(item[1].SOPInstanceUID))
    assert statuses(out) == [0xFF00, 0xFF00, 0xFE00]
    assert uids == ["1.2.1.1.1", "1.2.1.1.2"]
    assert records[-1]["cancelled"] is True and records[-1]["instances"] == 4


def test_abandoned_requests_are_still_audited(cfg: Any) -> None:
    with audit.capture() as records:
        gen = qr.handle_get(FakeEvent(study_query(StudyInstanceUID="1.2.1"), STUDY_GET,
                                      {"get"}), FakeServices(cfg))  # type: ignore[arg-type]
        assert next(gen) == 4
        next(gen)
        gen.close()  # what pynetdicom's abandoning of the generator amounts to
        # only matches yielded one by one (a syntax find.py does not frame) can be abandoned
        find = qr.handle_find(FakeEvent(study_query(), STUDY_FIND, {"find"},
                                        transfer_syntax=BIG_ENDIAN),
                              FakeServices(cfg))  # type: ignore[arg-type]
        next(find)
        find.close()
    assert [(r["event"], r.get("interrupted")) for r in records] == [
        ("dicom.retrieve", True), ("dicom.query", True)]


@pytest.mark.parametrize("sop_class,msg_id", [("1.2.840.10008.5.1.4.1.2.2.1", 7),
                                              ("1.2.840.10008.5.1.4.1.2.1.1", 65535)])
def test_fast_pending_find_command_is_pynetdicoms_bytes(sop_class: str, msg_id: int) -> None:
    from io import BytesIO

    from pynetdicom.dimse_messages import C_FIND_RSP
    from pynetdicom.dimse_primitives import C_FIND
    from pynetdicom.dsutils import encode

    rsp = C_FIND()
    rsp.MessageIDBeingRespondedTo = msg_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.Status = 0xFF00
    rsp.Identifier = BytesIO(b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY ")
    msg = C_FIND_RSP()
    msg.primitive_to_message(rsp)
    assert find.encode_find_pending(sop_class, msg_id) == encode(msg.command_set, True, True)


def test_fast_pending_find_fragments_to_the_peer_pdu_size() -> None:
    from io import BytesIO

    from pynetdicom.dimse_primitives import C_FIND

    sent: list[Any] = []
    dimse = SimpleNamespace(send_msg=lambda p, c: sent.append(("slow", p)),
                            maximum_pdu_size=16,
                            dul=SimpleNamespace(send_pdu=lambda p: sent.append(("pdu", p))))
    replies = qr._Replies(SimpleNamespace(dimse=dimse))
    rsp = C_FIND()
    rsp.MessageIDBeingRespondedTo = 3
    rsp.AffectedSOPClassUID = STUDY_FIND
    rsp.Status = 0xFF00
    rsp.Identifier = BytesIO(bytes(range(25)))
    dimse.send_msg(rsp, 5)
    pdvs = [p.presentation_data_value_list[0] for kind, p in sent]
    assert [p[0] for p in pdvs] == [5, 5, 5, 5]
    assert [p[1][0] for p in pdvs] == [0x03, 0x00, 0x00, 0x02]  # command, data..., last
    assert b"".join(p[1][1:] for p in pdvs[1:]) == bytes(range(25))
    assert all(len(p[1]) <= 16 - 6 + 1 for p in pdvs[1:])  # header byte + data
    final = C_FIND()
    final.MessageIDBeingRespondedTo = 3
    final.Status = 0x0000
    dimse.send_msg(final, 5)
    assert sent[-1] == ("slow", final) and replies is not None


@pytest.mark.parametrize("max_pdu", [0, 16384, 120, 40])
def test_sender_batches_what_frame_pending_frames(max_pdu: int) -> None:
    dul = FakeDul()
    assoc = SimpleNamespace(dimse=SimpleNamespace(dul=dul, maximum_pdu_size=max_pdu))
    pending = find.PendingSender(assoc, 5, STUDY_FIND, 9)
    ids = [bytes(range(n)) for n in (0, 1, 30, 101)]
    for i in ids:
        pending.add(i)
    assert not dul.pdus  # buffered until flushed (or 64 KiB / 50 ms)
    pending.flush()
    pending.flush()  # nothing left: nothing sent
    command = find.encode_find_pending(STUDY_FIND, 9)
    [(cx, raw)] = dul.pdus[0].presentation_data_value_list
    assert len(dul.pdus) == 1 and cx == 5
    assert raw.data == b"".join(find.frame_pending(command, i, 5, max_pdu) for i in ids)


@pytest.mark.parametrize("sop_class,msg_id", [("1.2.840.10008.5.1.4.1.2.2.1", 7),
                                              ("1.2.840.10008.5.1.4.1.2.1.1", 65535)])
def test_fast_final_find_is_pynetdicoms_bytes(sop_class: str, msg_id: int) -> None:
    from pynetdicom.dimse_messages import C_FIND_RSP
    from pynetdicom.dimse_primitives import C_FIND
    from pynetdicom.dsutils import encode

    rsp = C_FIND()  # as pynetdicom's C-FIND SCP fills its final response
    rsp.MessageID = rsp.MessageIDBeingRespondedTo = msg_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.Status = 0x0000
    assert find.plain_final(rsp)
    msg = C_FIND_RSP()
    msg.primitive_to_message(rsp)
    [(cx, pdv)] = find.final_pdata(rsp, 9).presentation_data_value_list
    assert cx == 9 and pdv == b"\x03" + encode(msg.command_set, True, True)
    rsp.ErrorComment = "x"
    assert not find.plain_final(rsp)  # comments, failures: pynetdicom's encoder
    rsp.ErrorComment, rsp.Status = None, 0xA700
    assert not find.plain_final(rsp)


def test_final_find_takes_the_fast_path_other_statuses_do_not() -> None:
    from pynetdicom.dimse_primitives import C_FIND

    sent: list[Any] = []
    dimse = SimpleNamespace(send_msg=lambda p, c: sent.append(("slow", p)),
                            maximum_pdu_size=0,
                            dul=SimpleNamespace(send_pdu=lambda p: sent.append(("pdu", p))))
    qr._Replies(SimpleNamespace(dimse=dimse))
    for code in (0x0000, 0xA700):
        rsp = C_FIND()
        rsp.MessageIDBeingRespondedTo = 3
        rsp.AffectedSOPClassUID = STUDY_FIND
        rsp.Status = code
        dimse.send_msg(rsp, 5)
    assert [kind for kind, _ in sent] == ["pdu", "slow"]
