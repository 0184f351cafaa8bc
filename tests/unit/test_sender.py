"""scp/sender.py: the hand-framed C-STORE send path of C-MOVE/C-GET sub-operations.

The command set and the framing are checked byte for byte against pynetdicom's own
encoders; the whole path against a real pynetdicom Storage SCP on loopback (16 KB PDUs,
as DCMTK offers), including pynetdicom's own send_c_store and release afterwards on the
same association (its state must stay consistent).
"""

from __future__ import annotations

import io
import os
import struct
import threading
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import (
    C_GET_RSP,
    C_MOVE_RSP,
    C_STORE_RQ,
    C_STORE_RSP,
    DIMSEMessage,
)
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import split_dataset

from pacsd.scp import sender


def _ct(path: Path, pixels: int, ts: str = ExplicitVRLittleEndian) -> Path:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = "SENDER"
    ds.Columns = 512
    ds.Rows = max(1, pixels // 1024)  # 2-byte pixels: about `pixels` bytes
    ds.BitsAllocated = 16
    ds.PixelData = os.urandom(2 * ds.Rows * ds.Columns)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ts
    ds.save_as(path, enforce_file_format=True, implicit_vr=ts == ImplicitVRLittleEndian)
    return path


@pytest.mark.parametrize("aet,orig_id", [(None, None), ("MOVESCU", 17), ("ODD", 65535),
                                         ("SIXTEEN_CHARS_AE", 1)])
@pytest.mark.parametrize("priority", [0, 1, 2])
def test_store_rq_equals_pynetdicom(aet: str | None, orig_id: int | None,
                                    priority: int) -> None:
    p = C_STORE()
    p.MessageID = 4242
    p.Priority = priority
    p.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    p.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.12345"  # odd length: padded
    p.MoveOriginatorApplicationEntityTitle = aet
    p.MoveOriginatorMessageID = orig_id
    p._dataset_path = (Path("x"), 0)  # type: ignore[attr-defined]  # a dataset follows
    msg = C_STORE_RQ()
    msg.primitive_to_message(p)
    ref = next(iter(msg.encode_msg(1, 16384))).presentation_data_value_list[0][1][1:]
    mine = sender.encode_store_rq(p.AffectedSOPClassUID, p.AffectedSOPInstanceUID, 4242,
                                  priority, aet, orig_id)
    assert mine == ref


@pytest.mark.parametrize("kind", [C_MOVE, C_GET])
@pytest.mark.parametrize("counts", [(999, 1, 0, 0), (0, 65535, 0, 0), (3, 4, 5, 6)])
def test_pending_retrieve_rsp_equals_pynetdicom(kind: type, counts: tuple[int, ...]) -> None:
    rsp = kind()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.2"
    rsp.Status = 0xFF00
    rsp.Identifier = None
    (rsp.NumberOfRemainingSuboperations, rsp.NumberOfCompletedSuboperations,
     rsp.NumberOfFailedSuboperations, rsp.NumberOfWarningSuboperations) = counts
    msg = (C_MOVE_RSP if kind is C_MOVE else C_GET_RSP)()
    msg.primitive_to_message(rsp)
    ref = [p.presentation_data_value_list[0][1] for p in msg.encode_msg(3, 16384)]
    assert len(ref) == 1 and ref[0][:1] == b"\x03"  # the command set only, no dataset
    mine = sender.encode_retrieve_pending(0x8021 if kind is C_MOVE else 0x8010,
                                          rsp.AffectedSOPClassUID, 7, *counts)
    assert mine == ref[0][1:]
    # and qr's reply filter sends exactly that for such a response, pynetdicom the rest
    from pacsd.scp import qr

    sent: list[bytes] = []
    passed: list[Any] = []

    class Dul:
        def send_pdu(self, p: Any) -> None:
            sent.append(p.presentation_data_value_list[0][1])

    class Dimse:
        dul = Dul()

        def send_msg(self, p: Any, cx: int) -> None:
            passed.append(p)

    class Assoc:
        dimse = Dimse()

    assoc = Assoc()
    qr._Replies.of(assoc)
    assoc.dimse.send_msg(rsp, 3)
    assert sent == ref and passed == []
    rsp.Status = 0x0000  # a final response is pynetdicom's to encode
    assoc.dimse.send_msg(rsp, 3)
    assert passed == [rsp] and sent == ref


def _decoded_by_pynetdicom(primitive: Any, msg_cls: type) -> Any:
    msg = msg_cls()
    msg.primitive_to_message(primitive)
    pdata = next(iter(msg.encode_msg(1, 16384)))
    back = DIMSEMessage()
    assert back.decode_msg(pdata)
    return pdata.presentation_data_value_list[0][1][1:], back.message_to_primitive()


@pytest.mark.parametrize("status,comment", [(0x0000, None), (0xB000, "coerced"),
                                            (0xA700, "odd"), (0xC000, None)])
@pytest.mark.parametrize("instance", ["1.2.826.0.1.3680043.8.498.1",
                                      "1.2.826.0.1.3680043.8.498.12", None])
def test_store_rsp_decodes_as_pynetdicom_decodes(status: int, comment: str | None,
                                                 instance: str | None) -> None:
    p = C_STORE()
    p.MessageIDBeingRespondedTo = 65535
    p.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    p.AffectedSOPInstanceUID = instance
    p.Status = status
    p.ErrorComment = comment
    cmd, ref = _decoded_by_pynetdicom(p, C_STORE_RSP)
    mine = sender.decode_store_rsp(cmd)
    assert type(mine) is type(ref)
    for name in ("MessageIDBeingRespondedTo", "Status", "AffectedSOPClassUID",
                 "AffectedSOPInstanceUID", "ErrorComment", "OffendingElement",
                 "MessageID"):
        assert getattr(mine, name) == getattr(ref, name), name
    assert mine.is_valid_response


def test_other_responses_are_left_to_pynetdicom() -> None:
    p = C_STORE()
    p.MessageIDBeingRespondedTo = 1
    p.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    p.Status = 0xC000
    p.OffendingElement = [0x00100010]  # not one of the elements the hand decoder knows
    cmd, _ = _decoded_by_pynetdicom(p, C_STORE_RSP)
    assert sender.decode_store_rsp(cmd) is None
    rsp = C_MOVE()
    rsp.MessageIDBeingRespondedTo = 1
    rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.2"
    rsp.Status = 0
    cmd, _ = _decoded_by_pynetdicom(rsp, C_MOVE_RSP)
    assert sender.decode_store_rsp(cmd) is None
    assert sender.decode_store_rsp(cmd[:-3]) is None  # truncated
    assert sender.decode_store_rsp(b"") is None


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_read_meta_finds_what_pynetdicom_finds(tmp_path: Path, ts: str) -> None:
    path = _ct(tmp_path / "a.dcm", 100, ts)
    meta, offset = split_dataset(path)
    with open(path, "rb") as f:
        mine = sender.read_meta(f)
    assert mine.dataset_offset == offset
    assert mine.sop_class_uid == meta.MediaStorageSOPClassUID
    assert mine.sop_instance_uid == meta.MediaStorageSOPInstanceUID
    assert mine.transfer_syntax_uid == ts


def test_read_meta_reads_on_through_a_long_group() -> None:
    """A group 0002 longer than the first read (large private OB elements)."""
    def el(e: int, vr: bytes, val: bytes) -> bytes:
        if vr == b"OB":
            return struct.pack("<HH2s2xI", 2, e, vr, len(val)) + val
        return struct.pack("<HH2sH", 2, e, vr, len(val)) + val

    body = (el(2, b"UI", b"1.2.3\0") + el(3, b"UI", b"1.2.3.4\0")
            + el(0x10, b"UI", b"1.2.840.10008.1.2.1\0")
            + b"".join(el(0x100 + i, b"OB", b"x" * 3000) for i in range(4)))
    data = b"\0" * 128 + b"DICM" + body + struct.pack("<HHI", 8, 0x16, 0) + b"rest"
    meta = sender.read_meta(io.BufferedReader(io.BytesIO(data)))  # type: ignore[arg-type]
    assert meta == sender.FileMeta("1.2.3", "1.2.3.4", "1.2.840.10008.1.2.1", 132 + len(body))


@pytest.mark.parametrize("data", [b"", b"DICM" * 3, b"\0" * 128 + b"DICX" + b"\0" * 20])
def test_read_meta_refuses_what_is_not_part10(data: bytes) -> None:
    with pytest.raises(sender.Unsupported):
        sender.read_meta(io.BytesIO(data))


def _parse(stream: bytes) -> list[tuple[int, int, int, bytes]]:
    """(pdu length, context id, message control header, fragment) per P-DATA-TF PDU."""
    out = []
    o = 0
    while o < len(stream):
        kind, _, length, item_len, cx, mch = struct.unpack_from(">BBIIBB", stream, o)
        assert kind == 0x04 and item_len == length - 4  # one PDV per PDU
        out.append((length, cx, mch, stream[o + 12:o + 6 + length]))
        o += 6 + length
    assert o == len(stream)
    return out


@pytest.mark.parametrize("length", [0, 1, 16378, 16379, 1_000_000, 3 * 1024 * 1024 + 5])
@pytest.mark.parametrize("max_pdu", [16384, 8192 + 3, 4 * 1024 * 1024])
def test_framing_splits_like_pynetdicom(length: int, max_pdu: int) -> None:
    data = os.urandom(length)
    cmd = sender.encode_store_rq("1.2.3", "1.2.3.4", 1)
    fragment = min(max_pdu - 6, sender.MAX_FRAGMENT)
    buffers = list(sender._buffers(io.BytesIO(data), length, 5, fragment, cmd))
    assert [last for _, last in buffers] == [False] * (len(buffers) - 1) + [True]
    # memory per queued buffer is bounded whatever the object's size; PDUs never span two
    for b, _ in buffers:
        payload = sum(len(frag) for *_, frag in _parse(bytes(b)))
        assert payload <= max(sender.BUFFER_BYTES, fragment) + len(cmd)
    pdus = _parse(b"".join(bytes(b) for b, _ in buffers))
    assert pdus[0][1:] == (5, 0x03, cmd)
    body = pdus[1:]
    assert all(cx == 5 for _, cx, _, _ in body)
    assert [mch for _, _, mch, _ in body] == [0x00] * (len(body) - 1) + [0x02]
    assert all(length_ <= max_pdu for length_, _, _, _ in pdus)
    assert b"".join(frag for *_, frag in body) == data
    # pynetdicom cuts the same fragments: all but the last are max_pdu - 6 bytes long
    if max_pdu - 6 <= sender.MAX_FRAGMENT and length:
        assert [len(f) for *_, f in body[:-1]] == [max_pdu - 6] * (len(body) - 1)


# ---------------------------------------------------------------------------- on the wire
class _Scp:
    """A pynetdicom Storage SCP on loopback recording each C-STORE's dataset bytes."""

    def __init__(self, max_pdu: int = 16384, ts: list[str] | None = None) -> None:
        self.received: list[tuple[int, str, bytes, Any]] = []
        self.ae = AE(ae_title="DEST")
        self.ae.maximum_pdu_size = max_pdu
        self.ae.add_supported_context(CTImageStorage, ts or [ExplicitVRLittleEndian,
                                                             ImplicitVRLittleEndian])
        self.server = self.ae.start_server(("127.0.0.1", 0), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = self.server.socket.getsockname()[1]

    def _store(self, event: Any) -> int:
        req = event.request
        self.received.append((int(req.MessageID), str(req.AffectedSOPInstanceUID),
                              req.DataSet.getvalue(), req.MoveOriginatorMessageID))
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture()
def scp() -> Any:
    s = _Scp()
    yield s
    s.close()


def _associate(port: int, ts: str = ExplicitVRLittleEndian) -> Any:
    ae = AE(ae_title="PACSD")
    ae.add_requested_context(CTImageStorage, [ts])
    ae.dimse_timeout = ae.acse_timeout = ae.network_timeout = 20
    assoc = ae.associate("127.0.0.1", port, ae_title="DEST")
    assert assoc.is_established
    return assoc


def test_sends_what_is_stored_and_pynetdicom_carries_on(tmp_path: Path, scp: _Scp) -> None:
    files = [_ct(tmp_path / f"{i}.dcm", n) for i, n in
             enumerate([10, 16_000, 700_000, 2_500_000])]
    assoc = _associate(scp.port)
    try:
        for i, path in enumerate(files):
            with open(path, "rb") as f:
                rsp = sender.send_c_store(assoc, f, msg_id=i + 1, originator_aet="MOVESCU",
                                          originator_id=9)
            assert rsp.Status == 0x0000
        # pynetdicom's own path on the same association after ours (reactor restarted)
        rsp = assoc.send_c_store(str(files[0]), msg_id=99)
        assert rsp.Status == 0x0000
        with open(files[1], "rb") as f:  # and ours again after pynetdicom's
            assert sender.send_c_store(assoc, f, msg_id=100).Status == 0x0000
    finally:
        assoc.release()
    assert assoc.is_released
    assert [r[0] for r in scp.received] == [1, 2, 3, 4, 99, 100]
    assert [r[3] for r in scp.received[:4]] == [9] * 4
    for (_, uid, data, _), path in zip(scp.received, [*files, files[0], files[1]],
                                       strict=True):
        meta, offset = split_dataset(path)
        assert uid == meta.MediaStorageSOPInstanceUID
        assert data == path.read_bytes()[offset:]


def test_other_transfer_syntax_is_unsupported_before_anything_is_sent(
        tmp_path: Path, scp: _Scp) -> None:
    path = _ct(tmp_path / "a.dcm", 1000)  # explicit VR LE; only implicit accepted
    assoc = _associate(scp.port, ImplicitVRLittleEndian)
    try:
        with open(path, "rb") as f, pytest.raises(sender.Unsupported):
            sender.send_c_store(assoc, f)
        assert assoc.is_established
        implicit = _ct(tmp_path / "b.dcm", 1000, ImplicitVRLittleEndian)
        with open(implicit, "rb") as f:
            assert sender.send_c_store(assoc, f, msg_id=2).Status == 0x0000
    finally:
        assoc.release()
    assert [r[0] for r in scp.received] == [2]


@pytest.mark.parametrize("direct", [False, True], ids=["via-dul", "direct"])
def test_peer_gone_midway_fails_without_hanging(tmp_path: Path, direct: bool) -> None:
    """The destination aborts while a large dataset is being sent: the call ends (an
    exception or an empty status), the association is no longer established. `direct`:
    this thread writes and reads the socket under the lease (C-MOVE), which is given
    back."""
    if direct:
        from pacsd.scp import tuning

        tuning.apply()  # the DUL loop with its lease hook, as in a worker
    s = _Scp()
    seen = threading.Event()
    pdata = [0]

    def abort_on_data(event: Any) -> None:
        if type(event.pdu).__name__ != "P_DATA_TF":
            return
        pdata[0] += 1
        if pdata[0] == 20 and not seen.is_set():  # about 320 KB into the dataset
            seen.set()
            threading.Thread(target=event.assoc.abort, daemon=True).start()

    s.server.bind(evt.EVT_PDU_RECV, abort_on_data)
    path = _ct(tmp_path / "big.dcm", 20_000_000)
    assoc = _associate(s.port)
    try:
        with open(path, "rb") as f:
            try:
                rsp = sender.send_c_store(assoc, f, direct=direct)
            except (ConnectionError, RuntimeError):
                rsp = None
        assert rsp is None or "Status" not in rsp
        for _ in range(100):
            if not assoc.is_established:
                break
            threading.Event().wait(0.05)
        assert not assoc.is_established
        assert seen.is_set()
        if direct:
            assert not assoc.dul.is_alive() or not assoc.dul._pacsd_lease.held
    finally:
        if assoc.is_established:
            assoc.abort()
        s.close()
    assert s.received == []
