"""scp/sender.py's C-MOVE fast path: objects framed ahead (sender.frame, Framer, Prepared,
retrieve.read_framed: the hashed bytes are the sent bytes) and the socket lease that lets
the sending thread write and read the socket itself while the DUL reactor is parked.

The lease is checked against a stand-in reactor loop (the hook scp/tuning.py's DUL loop
calls) for mutual exclusion, keeping, revoking and reclaiming; the whole direct path
against a real pynetdicom Storage SCP with the node's tuning applied.
"""

from __future__ import annotations

import hashlib
import io
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.dsutils import split_dataset

from pacsd.scp import sender, tuning
from pacsd.store import retrieve
from pacsd.store.envelope import MAGIC
from pacsd.store.objects import IntegrityError, ObjectStore
from pacsd.store.query import Selected

from .test_query_retrieve import _put
from .test_sender import _associate, _ct, _parse, _Scp


# ---------------------------------------------------------------------------- lease
class _Reactor:
    """A DUL loop stand-in: each iteration calls dul_yield, then 'uses the socket' for a
    moment; records whether a sender ever used it at the same time."""

    def __init__(self, lease: sender.SocketLease) -> None:
        self.lease = lease
        self.user: str | None = None
        self.overlaps = 0
        self.iterations = 0
        self._kill_thread = False
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop:
            self.lease.dul_yield(self)
            if self.user is not None:
                self.overlaps += 1
            self.user = "dul"
            time.sleep(0.0002)
            self.user = None
            self.iterations += 1

    def use(self) -> None:  # what a sender does with the socket
        if self.user is not None:
            self.overlaps += 1
        self.user = "sender"
        time.sleep(0.0002)
        self.user = None

    def close(self) -> None:
        self.stop = True
        self.lease.revoke()
        self.thread.join(5)


@pytest.fixture()
def reactor() -> Any:
    r = _Reactor(sender.SocketLease(lambda: None, idle_reclaim=30.0))
    yield r
    r.close()


def _still(r: _Reactor, seconds: float = 0.05) -> bool:
    """The reactor did not run for `seconds`."""
    n = r.iterations
    time.sleep(seconds)
    return r.iterations == n


def test_lease_excludes_the_reactor_and_is_kept_between_exchanges(reactor: _Reactor) -> None:
    lease = reactor.lease
    for i in range(200):
        lease.begin(lambda: True)
        reactor.use()
        lease.end(keep=i % 7 != 0)  # sometimes handed back, sometimes kept
    assert reactor.overlaps == 0
    lease.begin(lambda: True)
    lease.end(keep=True)
    assert lease.held and _still(reactor)  # kept: the reactor stays parked
    lease.revoke()  # e.g. send_pdu(A-RELEASE-RQ): the reactor runs again
    assert not lease.held and not _still(reactor)


def test_revoke_during_an_exchange_hands_back_at_its_end(reactor: _Reactor) -> None:
    lease = reactor.lease
    lease.begin(lambda: True)
    lease.revoke()
    assert lease.held and _still(reactor)  # not in the middle of the exchange
    lease.end(keep=True)
    assert not lease.held and not _still(reactor)


def test_idle_turn_reclaimed_and_stop_honoured() -> None:
    r = _Reactor(sender.SocketLease(lambda: None, idle_reclaim=0.1))
    try:
        r.lease.begin(lambda: True)
        r.lease.end(keep=True)
        time.sleep(0.6)
        assert not r.lease.held and not _still(r)  # a forgotten turn does not hang it
        r.lease.idle_reclaim = 30.0
        r.lease.begin(lambda: True)
        r.lease.end(keep=True)
        assert _still(r)
        r._kill_thread = True  # the DUL is told to stop: it takes the turn back
        time.sleep(0.6)
        assert not r.lease.held
    finally:
        r.close()


def test_handing_back_wakes_the_reactor() -> None:
    """What a sender queued for the reactor (an abort it read, say) is seen at once, not
    after the reactor's idle poll."""
    wakes: list[int] = []
    r = _Reactor(sender.SocketLease(lambda: wakes.append(1), idle_reclaim=30.0))
    try:
        r.lease.begin(lambda: True)
        n = len(wakes)  # begin woke it to park
        r.lease.end(keep=True)
        assert len(wakes) == n
        r.lease.begin(lambda: True)
        r.lease.end(keep=False)
        assert len(wakes) == n + 1
    finally:
        r.close()


def test_begin_fails_when_the_reactor_is_gone() -> None:
    lease = sender.SocketLease(lambda: None)
    t0 = time.monotonic()
    with pytest.raises(ConnectionError):
        lease.begin(lambda: time.monotonic() - t0 < 0.1)
    assert not lease.held


# ---------------------------------------------------------------------------- framing
@pytest.mark.parametrize("length", [0, 1, 16378, 16379, 500_000])
@pytest.mark.parametrize("fragment", [16378, 8000, sender.MAX_FRAGMENT])
def test_prepared_frames_equal_the_streamed_ones(length: int, fragment: int) -> None:
    data = bytes(range(256)) * (length // 256) + b"x" * (length % 256)
    cmd = sender.encode_store_rq("1.2.3", "1.2.3.4", 7)
    streamed = b"".join(bytes(b) for b, _ in
                        sender._buffers(io.BytesIO(data), length, 3, fragment, cmd))
    frames, views = sender.frame(memoryview(data), 3, fragment)
    assert bytes(frames[:sender.HEADROOM]) == bytes(sender.HEADROOM)
    assert b"".join(bytes(v) for v in views) == data
    assert all(v.obj is frames for v in views)  # views of the buffer that is sent
    p = sender.Prepared(sender.FileMeta("1.2.3", "1.2.3.4", "1.2.840.10008.1.2.1", 0), 3,
                        frames, None)
    out = b"".join(bytes(b) for b in p.with_command(cmd))
    assert out == streamed
    pdus = _parse(out)
    assert pdus[0][1:] == (3, 0x03, cmd)


def test_a_command_beyond_the_headroom_goes_alone() -> None:
    frames, _ = sender.frame(memoryview(b"abc"), 1, 100)
    p = sender.Prepared(sender.FileMeta("1", "2", "3", 0), 1, frames, None)
    cmd = b"c" * (sender.HEADROOM + 2)
    parts = p.with_command(cmd)
    assert len(parts) == 2
    assert [pdu[1:] for pdu in _parse(b"".join(bytes(x) for x in parts))] == [
        (1, 0x03, cmd), (1, 0x02, b"abc")]


@pytest.mark.parametrize("length", [0, 5, 16378 * 3, 2_000_000])
def test_read_into_scatters_the_file_over_the_slots(tmp_path: Path, length: int) -> None:
    data = bytes((i * 7) & 0xFF for i in range(length + 100))
    path = tmp_path / "f"
    path.write_bytes(data)
    out = bytearray(sender.framed_size(length, 1000))  # > IOV_MAX slots at 2 MB
    views = sender.layout(out, length, 9, 1000)
    with open(path, "rb") as f:
        assert sender.read_into(f.fileno(), views, 100) == length
        assert b"".join(bytes(v) for v in views) == data[100:]
        assert [p[1:3] for p in _parse(bytes(out[sender.HEADROOM:]))][-1] == (9, 0x02)
        out = bytearray(sender.framed_size(length + 50, 1000))
        views = sender.layout(out, length + 50, 9, 1000)  # the file ends before them
        assert sender.read_into(f.fileno(), views, 100) == length


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_parse_meta_equals_read_meta(tmp_path: Path, ts: str) -> None:
    path = _ct(tmp_path / "a.dcm", 3000, ts)
    with open(path, "rb") as f:
        assert sender.parse_meta(path.read_bytes()) == sender.read_meta(f)


# ---------------------------------------------------------------------------- read_framed
class _FakeAssoc:
    """What Framer asks of an association: the peer's maximum PDU and its contexts."""

    def __init__(self, max_pdu: int = 16384, accepted: str = ExplicitVRLittleEndian) -> None:
        self.dimse = type("D", (), {"maximum_pdu_size": max_pdu})()
        self.accepted = accepted

    def _get_valid_context(self, sop_class: str, ts: str, role: str, **kw: Any) -> Any:
        if ts != self.accepted:
            raise ValueError("No presentation context")
        return type("C", (), {"transfer_syntax": [ts], "context_id": 5})()


@pytest.fixture()
def dicom_store(tmp_path: Path) -> tuple[ObjectStore, list[Selected], list[bytes]]:
    store = ObjectStore(tmp_path / "objects")
    store.ensure()
    datas = [_ct(tmp_path / f"{i}.dcm", n).read_bytes()
             for i, n in enumerate([100, 40_000, 300_000, 1_000])]
    sels = [Selected(f"1.2.3.{i}", "1.2.840.10008.5.1.4.1.1.2", ExplicitVRLittleEndian,
                     _put(store, d), len(d), "1.2.3") for i, d in enumerate(datas)]
    return store, sels, datas


def test_read_framed_sends_what_it_hashed(dicom_store: Any) -> None:
    store, sels, datas = dicom_store
    framer = sender.Framer(_FakeAssoc())
    p = retrieve.read_framed(store, sels[2].sha256, framer, sender.PREPARE_MAX)
    assert isinstance(p, sender.Prepared) and p.context_id == 5
    offset = sender.parse_meta(datas[2]).dataset_offset
    body = [frag for *_, frag in _parse(bytes(p.frames[sender.HEADROOM:p.end]))]
    assert all(len(f) <= 16378 for f in body)
    assert b"".join(body) == datas[2][offset:]
    # its buffer, once sent, frames the next object: no stale byte survives
    p.recycle()
    q = retrieve.read_framed(store, sels[1].sha256, framer, sender.PREPARE_MAX)
    assert isinstance(q, sender.Prepared)
    offset = sender.parse_meta(datas[1]).dataset_offset
    body = [frag for *_, frag in _parse(bytes(q.frames[sender.HEADROOM:q.end]))]
    assert b"".join(body) == datas[1][offset:]

    class Sloppy(sender.Framer):  # a framing bug changes one sent byte
        def __call__(self, fd: int, size: int) -> Any:
            got = super().__call__(fd, size)
            assert got is not None
            got[0].frames[got[0].end - 1] ^= 1
            return got

    with pytest.raises(IntegrityError) as e:
        retrieve.read_framed(store, sels[2].sha256, Sloppy(_FakeAssoc()), sender.PREPARE_MAX)
    assert e.value.actual and e.value.actual != sels[2].sha256


def test_read_framed_refuses_corrupt_and_missing_passes_on_the_rest(
        dicom_store: Any) -> None:
    store, sels, datas = dicom_store
    framer = sender.Framer(_FakeAssoc())
    victim = store.path_for(sels[1].sha256)
    victim.chmod(0o600)
    victim.write_bytes(datas[1][:-1] + bytes([datas[1][-1] ^ 1]))
    with pytest.raises(IntegrityError) as e:
        retrieve.read_framed(store, sels[1].sha256, framer, sender.PREPARE_MAX)
    assert e.value.actual == hashlib.sha256(victim.read_bytes()).hexdigest()
    store.path_for(sels[3].sha256).unlink()
    with pytest.raises(IntegrityError) as e:
        retrieve.read_framed(store, sels[3].sha256, framer, sender.PREPARE_MAX)
    assert e.value.actual is None
    # larger than the limit, not framable here, encrypted: None (opened verified instead)
    assert retrieve.read_framed(store, sels[2].sha256, framer, 1000) is None
    other = sender.Framer(_FakeAssoc(accepted=ImplicitVRLittleEndian))
    assert retrieve.read_framed(store, sels[2].sha256, other, sender.PREPARE_MAX) is None
    env = store.path_for(sels[0].sha256)
    env.chmod(0o600)
    env.write_bytes(MAGIC + datas[0])
    assert retrieve.read_framed(store, sels[0].sha256, framer, sender.PREPARE_MAX) is None


def test_verify_ahead_with_a_framer(dicom_store: Any) -> None:
    store, sels, datas = dicom_store
    ahead = retrieve.VerifyAhead(store, sels, framer=sender.Framer(_FakeAssoc()),
                                 limit=200_000)
    got = [ahead.open(s) for s in sels]
    ahead.close()
    assert [type(g).__name__ for g in got] == ["Prepared", "Prepared", "BufferedReader",
                                               "Prepared"]  # 300 KB > limit: a file
    assert got[2].read() == datas[2]
    for g in got:
        g.close()


# ---------------------------------------------------------------------------- on the wire
@pytest.fixture()
def tuned() -> None:
    tuning.apply()  # the DUL loop with its lease hook, as in a worker


def test_direct_exchange_sends_what_is_stored_and_pynetdicom_carries_on(
        tmp_path: Path, tuned: None) -> None:
    scp = _Scp()
    files = [_ct(tmp_path / f"{i}.dcm", n) for i, n in
             enumerate([10, 16_000, 700_000, 2_500_000])]
    assoc = _associate(scp.port)
    try:
        framer = sender.Framer(assoc)
        for i, path in enumerate(files):
            if i % 2:
                item: Any = open(path, "rb")  # noqa: SIM115 - closed below
            else:
                with open(path, "rb") as g:
                    framed = framer(g.fileno(), path.stat().st_size)
                assert framed is not None
                item = framed[0]
            rsp = sender.send_c_store(assoc, item, msg_id=i + 1, originator_aet="MOVESCU",
                                      originator_id=9, direct=True)
            item.close()
            assert rsp.Status == 0x0000
            assert assoc.dul._pacsd_lease.held  # kept between sub-operations
        # pynetdicom's own path after ours: its send_pdu takes the socket back
        assert assoc.send_c_store(str(files[0]), msg_id=99).Status == 0x0000
        assert not assoc.dul._pacsd_lease.held
        with open(files[1], "rb") as f:
            assert sender.send_c_store(assoc, f, msg_id=100, direct=True).Status == 0
    finally:
        assoc.release()
        scp.close()
    assert assoc.is_released
    assert [r[0] for r in scp.received] == [1, 2, 3, 4, 99, 100]
    for (_, _, data, _), path in zip(scp.received, [*files, files[0], files[1]],
                                     strict=True):
        _, offset = split_dataset(path)
        assert data == path.read_bytes()[offset:]


def test_direct_exchange_unusual_response_goes_through_pynetdicom(
        tmp_path: Path, tuned: None) -> None:
    """A response the hand decoder declines (an Offending Element) is given to the
    reactor, which decodes it as pynetdicom does."""
    scp = _Scp()

    def refuse(event: Any) -> Any:
        from pydicom.dataset import Dataset

        ds = Dataset()
        ds.Status = 0xA900
        ds.OffendingElement = [0x00100010]
        return ds

    scp.server.unbind(evt.EVT_C_STORE, scp._store)
    scp.server.bind(evt.EVT_C_STORE, refuse)
    path = _ct(tmp_path / "a.dcm", 1000)
    assoc = _associate(scp.port)
    try:
        with open(path, "rb") as f:
            rsp = sender.send_c_store(assoc, f, msg_id=3, direct=True)
        assert rsp.Status == 0xA900 and rsp.OffendingElement == 0x00100010
        with open(path, "rb") as f:  # and the next one goes on
            assert sender.send_c_store(assoc, f, msg_id=4, direct=True).Status == 0xA900
    finally:
        assoc.release()
        scp.close()
    assert assoc.is_released


def test_direct_exchange_dimse_timeout_aborts(tmp_path: Path, tuned: None) -> None:
    scp = _Scp()
    release = threading.Event()

    def slow(event: Any) -> int:
        release.wait(5)
        return 0

    scp.server.unbind(evt.EVT_C_STORE, scp._store)
    scp.server.bind(evt.EVT_C_STORE, slow)
    path = _ct(tmp_path / "a.dcm", 1000)
    assoc = _associate(scp.port)
    assoc.dimse_timeout = 0.5
    try:
        t0 = time.monotonic()
        with open(path, "rb") as f:
            rsp = sender.send_c_store(assoc, f, direct=True)
        assert "Status" not in rsp
        assert time.monotonic() - t0 < 4
        for _ in range(100):
            if not assoc.is_established:
                break
            time.sleep(0.05)
        assert assoc.is_aborted and not assoc.is_established
    finally:
        release.set()
        if assoc.is_established:
            assoc.abort()
        scp.close()


def test_pending_move_rsp_is_queued_without_a_wake() -> None:
    """qr._Replies: a pending C-MOVE-RSP goes on the DUL's queue as is (sent at its next
    turn, before the final response queued behind it); a C-GET one through send_pdu."""
    import queue

    from pynetdicom.dimse_primitives import C_GET, C_MOVE

    from pacsd.scp import qr

    class Dul:
        def __init__(self) -> None:
            self.to_provider_queue: queue.Queue[Any] = queue.Queue()
            self.woken: list[Any] = []

        def send_pdu(self, p: Any) -> None:
            self.woken.append(p)
            self.to_provider_queue.put(p)

    class Dimse:
        def __init__(self) -> None:
            self.dul = Dul()
            self.passed: list[Any] = []

        def send_msg(self, p: Any, cx: int) -> None:
            self.passed.append(p)
            self.dul.send_pdu(p)

    for kind, woken in ((C_MOVE, 0), (C_GET, 1)):
        assoc = type("A", (), {"dimse": Dimse()})()
        qr._Replies.of(assoc)
        rsp = kind()
        rsp.MessageIDBeingRespondedTo = 7
        rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.2"
        rsp.Status = 0xFF00
        (rsp.NumberOfRemainingSuboperations, rsp.NumberOfCompletedSuboperations,
         rsp.NumberOfFailedSuboperations, rsp.NumberOfWarningSuboperations) = (1, 2, 0, 0)
        assoc.dimse.send_msg(rsp, 3)
        final = kind()
        final.MessageIDBeingRespondedTo = 7
        final.Status = 0x0000
        assoc.dimse.send_msg(final, 3)
        dul = assoc.dimse.dul
        assert len(dul.woken) == woken + 1  # the final response always wakes the DUL
        sent = [dul.to_provider_queue.get_nowait() for _ in range(2)]
        assert sent[0].presentation_data_value_list[0][1][:1] == b"\x03"
        assert sent[1] is final and assoc.dimse.passed == [final]


# ---------------------------------------------------------------------------- response read
class _Raw:
    """A socket that returns the given chunks, then b'' (closed)."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)

    def recv(self, n: int) -> bytes:
        return self.chunks.pop(0)[:n] if self.chunks else b""


class _Dul:
    def __init__(self) -> None:
        import queue

        self.event_queue: queue.Queue[str] = queue.Queue()
        self._recv_pdu: queue.Queue[Any] = queue.Queue()
        self.state_machine = type("S", (), {"current_state": "Sta6"})()
        ae = type("AE", (), {"maximum_pdu_size": 16384})()
        self.socket = type("Sock", (), {"assoc": type("A", (), {"ae": ae})(),
                                         "_pacsd_header": None})()

    def _decode_pdu(self, b: bytearray) -> tuple[bytes, str]:
        return bytes(b), {1: "Evt6", 4: "Evt10", 5: "Evt12", 7: "Evt16"}[b[0]]

    def queued(self) -> list[tuple[str, bytes | None]]:
        out = []
        while not self.event_queue.empty():
            ev = self.event_queue.get()
            out.append((ev, None if ev in ("Evt17", "Evt19") else self._recv_pdu.get()))
        return out


def _store_rsp(msg_id: int = 7, cx: int = 3, status: int = 0) -> bytes:
    cmd = b"\x03" + tuning.encode_store_rsp("1.2.840.10008.5.1.4.1.1.2", msg_id, status,
                                              "1.2.3.4")
    return struct.pack(">BBIIB", 0x04, 0, len(cmd) + 5, len(cmd) + 1, cx) + cmd


def _taker(msg_id: int = 7, cx: int = 3) -> Any:
    t = sender._RspTaker()
    t.cx_id, t.msg_id, t.thread = cx, msg_id, threading.get_ident()
    return t


RELEASE_RQ = bytes.fromhex("05000000000400000000")
ABORT = bytes.fromhex("07000000000400000200")


@pytest.mark.parametrize("split", [0, 3, 6, 40])
def test_response_read_takes_our_store_rsp(split: int) -> None:
    dul = _Dul()
    pdu = _store_rsp()
    chunks = [pdu[:split], pdu[split:]] if split else [pdu]
    rsp, clean = sender._read_response(dul, _Raw(*chunks), _taker())
    assert rsp is not None and rsp.Status == 0 and rsp.MessageIDBeingRespondedTo == 7
    assert clean and dul.queued() == []


def test_response_read_queues_everything_else_for_the_reactor() -> None:
    dul = _Dul()  # our response, then a release request in the same read
    rsp, clean = sender._read_response(dul, _Raw(_store_rsp() + RELEASE_RQ), _taker())
    assert rsp is not None and not clean
    assert dul.queued() == [("Evt12", RELEASE_RQ)]
    dul = _Dul()  # another message's response, then an abort
    other = _store_rsp(msg_id=8)
    rsp, clean = sender._read_response(dul, _Raw(other, ABORT), _taker())
    assert rsp is None and not clean
    assert dul.queued() == [("Evt10", other)]  # the abort is the reactor's next read
    dul = _Dul()
    rsp, clean = sender._read_response(dul, _Raw(other + ABORT), _taker())
    assert dul.queued() == [("Evt10", other), ("Evt16", ABORT)]


@pytest.mark.parametrize("chunks,event", [
    ((), "Evt17"),  # closed
    ((b"\x04\x00\x00",), "Evt17"),  # closed inside the header
    ((_store_rsp()[:20],), "Evt17"),  # short PDU
    ((b"\x09\x00\x00\x00\x00\x04abcd",), "Evt19"),  # unknown PDU type
    ((b"\x04\x00" + struct.pack(">I", 1 << 30),), "Evt17"),  # beyond our maximum PDU
])
def test_response_read_errors_as_the_reactor_reads_them(chunks: tuple[bytes, ...],
                                                        event: str) -> None:
    dul = _Dul()
    rsp, clean = sender._read_response(dul, _Raw(*chunks), _taker())
    assert rsp is None and not clean
    assert dul.queued() == [(event, None)]


def test_placeholder_is_reused_and_dispatched_by_identity() -> None:
    """qr._Retrieval: one placeholder Dataset per retrieval, refilled per sub-operation;
    send_c_store of it sends the instance it stands for, anything else is pynetdicom's."""
    from types import SimpleNamespace

    from pydicom.dataset import Dataset

    from pacsd.scp import qr

    class Assoc:
        dimse = SimpleNamespace(maximum_pdu_size=16384)

        def send_c_store(self, ds: Any, *args: Any, **kwargs: Any) -> Any:
            return ("pynetdicom", ds)

    r = qr._Retrieval(SimpleNamespace(store=None),  # type: ignore[arg-type]
                      SimpleNamespace(audit_context=dict), "get")  # type: ignore[arg-type]
    sent: list[Any] = []
    r._send = lambda assoc, original, sel, *a, direct=False, **k: sent.append(  # type: ignore[method-assign]
        (sel, k["msg_id"], direct)) or "ours"
    assoc = Assoc()
    r.wrap(assoc)
    a = Selected("1.2.3.45", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", "0" * 64,
                 10, "1.2")
    b = Selected("1.2.3.4567", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1", "1" * 64,
                 10, "1.2")
    ph = r.placeholder(a)
    assert (ph.SOPInstanceUID, ph.SOPClassUID) == ("1.2.3.45", "1.2.840.10008.5.1.4.1.1.2")
    assert assoc.send_c_store(ph, msg_id=5) == "ours"
    assert r.placeholder(b) is ph  # the same object, now standing for b
    assert (ph.SOPInstanceUID, ph.SOPClassUID) == ("1.2.3.4567", "1.2.840.10008.5.1.4.1.1.4")
    assert assoc.send_c_store(ph, msg_id=6) == "ours"
    assert assoc.send_c_store(ph, msg_id=7)[0] == "pynetdicom"  # nothing pending for it
    other = Dataset()
    assert assoc.send_c_store(other, msg_id=8) == ("pynetdicom", other)
    assert sent == [(a, 5, False), (b, 6, False)]
