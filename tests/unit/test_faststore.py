"""scp/faststore.py: the in-thread C-STORE path gives the bytes, the rows and the response
pynetdicom's own path gives, and leaves everything else to pynetdicom."""

from __future__ import annotations

import queue
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import decode

from pacsd.scp import faststore
from pacsd.scp.state import AssocState, Services
from pacsd.store.index import Instance
from pacsd.store.ingest import Store

from .test_store_ingest import encode, make_dataset, write_config

CT = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"


def store_rq(ds: Dataset, *, message_id: int = 7, sop_instance: str | None = None,
             move: bool = False) -> C_STORE_RQ:
    p = C_STORE()
    p.MessageID = message_id
    p.AffectedSOPClassUID = ds.SOPClassUID
    p.AffectedSOPInstanceUID = sop_instance or ds.SOPInstanceUID
    p.Priority = 0
    if move:
        p.MoveOriginatorApplicationEntityTitle = "WORKSTATION"
        p.MoveOriginatorMessageID = 3
    p.DataSet = BytesIO(encode(ds))
    msg = C_STORE_RQ()
    msg.primitive_to_message(p)
    return msg


def pdus(msg: Any, max_pdu: int = 16384, context_id: int = 1) -> list[bytes]:
    """The P-DATA-TF PDU bodies (after the 6-byte header) pynetdicom would send."""
    from pynetdicom.pdu import P_DATA_TF

    out = []
    for primitive in msg.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        out.append(pdu.encode()[6:])
    return out


class Sent:
    def __init__(self) -> None:
        self.data: list[bytes] = []

    def send(self, b: bytes) -> None:
        self.data.append(bytes(b))


class Allow(Services):
    def __init__(self, store: Store, allow: bool = True) -> None:
        self.store = store
        self.allow = allow
        self.refused: list[str] = []

    def permitted(self, state: AssocState, service: str) -> bool:
        return self.allow

    def refuse_request(self, state: AssocState, service: str) -> None:
        self.refused.append(service)


def fake_assoc(*, contexts: dict[int, tuple[str, bool]] | None = None) -> Any:
    contexts = contexts or {1: (CT, True), 3: (VERIFICATION, True)}
    cxs = {i: SimpleNamespace(abstract_syntax=a, as_scp=scp,
                              transfer_syntax=[ExplicitVRLittleEndian])
           for i, (a, scp) in contexts.items()}
    return SimpleNamespace(
        _accepted_cx=cxs,
        acceptor=SimpleNamespace(accepted_common_extended={}),
        ae=SimpleNamespace(pacsd_max_request=1 << 20),
        dul=SimpleNamespace(socket=Sent(), event_queue=queue.Queue()),
    )


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = Store.open(write_config(tmp_path))
    yield s
    s.close()


def fast(store: Store, allow: bool = True, **kw: Any) -> tuple[faststore.FastStore, Any, Allow]:
    assoc = fake_assoc(**kw)
    services = Allow(store, allow)
    state = AssocState(assoc_id="a" * 32, source_ip="127.0.0.1", source_port=1, cert_sha256="",
                       calling_ae="MOD")
    faststore.attach(assoc, services, state)
    return assoc.pacsd_fast, assoc, services


def response(sent: bytes) -> Any:
    """Decode the one C-STORE-RSP PDU the fast path wrote."""
    assert sent[0] == 0x04 and int.from_bytes(sent[2:6], "big") == len(sent) - 6
    assert sent[10:12] == b"\x01\x03"  # context 1, last command fragment
    return decode(BytesIO(sent[12:]), True, True)


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("move", [False, True])
def test_command_decoder_agrees_with_pydicom(move: bool) -> None:
    ds = make_dataset()
    msg = store_rq(ds, message_id=65535, move=move)
    raw = msg.encoded_command_set.getvalue() if hasattr(msg.encoded_command_set,
                                                        "getvalue") else None
    if not raw:
        body = pdus(msg)[0]
        raw = body[6:4 + int.from_bytes(body[:4], "big")]
    cmd = faststore.decode_command(raw)
    ref = decode(BytesIO(raw), True, True)
    assert cmd is not None
    assert cmd["command"] == ref.CommandField == 1
    assert cmd["message_id"] == ref.MessageID == 65535
    assert cmd["sop_class"] == ref.AffectedSOPClassUID
    assert cmd["sop_instance"] == ref.AffectedSOPInstanceUID
    assert cmd["dataset_type"] == ref.CommandDataSetType
    assert cmd["priority"] == ref.Priority


@pytest.mark.parametrize("raw", [
    b"", b"\x00", b"\x08\x00\x10\x00\x02\x00\x00\x00AB",  # another group
    b"\x00\x00\x00\x01\x04\x00\x00\x00\x01\x00\x00\x00",  # CommandField of 4 bytes
    b"\x00\x00\x00\x01\x02\x00\x00\x00\x01",  # value runs past the end
    b"\x00\x00\x00\x09\x02\x00\x00\x00\x00\x00",  # an element this path does not know
    b"\x00\x00\x02\x00\x02\x00\x00\x00\xff\xfe",  # a UID that is not ASCII
])
def test_command_decoder_refuses_what_it_does_not_know(raw: bytes) -> None:
    assert faststore.decode_command(raw) is None


# --------------------------------------------------------------------------- storing


@pytest.mark.parametrize("max_pdu", [16384, 1 << 20, 300])
def test_stores_the_bytes_pynetdicom_would_and_answers_like_it(store: Store,
                                                               max_pdu: int) -> None:
    ds = make_dataset(pixels=40_000)
    fs, assoc, _ = fast(store)
    bodies = pdus(store_rq(ds), max_pdu)
    assert all(fs.feed(b) for b in bodies)
    rsp = response(assoc.dul.socket.data[0])
    assert (rsp.CommandField, rsp.Status, rsp.MessageIDBeingRespondedTo) == (0x8001, 0, 7)
    assert rsp.AffectedSOPInstanceUID == ds.SOPInstanceUID
    # byte-identical to pynetdicom's own C-STORE-RSP
    p = C_STORE()
    p.MessageIDBeingRespondedTo = 7
    p.AffectedSOPClassUID = ds.SOPClassUID
    p.AffectedSOPInstanceUID = ds.SOPInstanceUID
    p.Status = 0
    ref = C_STORE_RSP()
    ref.primitive_to_message(p)
    assert assoc.dul.socket.data[0][12:] == b"".join(
        x.presentation_data_value_list[0][1][1:] for x in ref.encode_msg(1, 16384))
    row = Instance.get(Instance.sop_instance_uid == ds.SOPInstanceUID)
    stored = store.objects.path_for(row.sha256).read_bytes()
    from pacsd.store.filemeta import file_meta_bytes

    assert stored == file_meta_bytes(CT, ds.SOPInstanceUID, ExplicitVRLittleEndian) + encode(ds)
    assert fs.stored == 1
    assert list(store.objects.tmp.iterdir()) == []


def test_a_refused_store_answers_with_the_status_and_comment(store: Store) -> None:
    ds = make_dataset()
    fs, assoc, _ = fast(store)
    for b in pdus(store_rq(ds, sop_instance=generate_uid())):  # request UID ≠ dataset's
        assert fs.feed(b)
    rsp = response(assoc.dul.socket.data[0])
    assert rsp.Status == 0xA900
    assert rsp.ErrorComment.startswith("dataset SOP Instance UID")
    assert Instance.select().count() == 0


def test_gate_5_applies(store: Store) -> None:
    fs, assoc, services = fast(store, allow=False)
    for b in pdus(store_rq(make_dataset())):
        assert fs.feed(b)
    assert response(assoc.dul.socket.data[0]).Status == 0x0124
    assert services.refused == ["store"]
    assert Instance.select().count() == 0
    assert list(store.objects.tmp.iterdir()) == []


# --------------------------------------------------------------------------- left to pynetdicom


def test_other_messages_and_split_command_sets_go_to_pynetdicom(store: Store) -> None:
    fs, _, _ = fast(store)
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = VERIFICATION
    e = C_ECHO_RQ()
    e.primitive_to_message(echo)
    assert not any(fs.feed(b) for b in pdus(e, context_id=3))
    # a C-STORE whose command set arrives in two PDUs: every PDU of it is pynetdicom's
    ds = make_dataset(pixels=2000)
    bodies = pdus(store_rq(ds), 300)
    item = bodies[0]
    n = int.from_bytes(item[:4], "big")
    data = item[6:4 + n]
    half = len(data) // 2
    first = (half + 2).to_bytes(4, "big") + b"\x01\x01" + data[:half]
    second = (len(data) - half + 2).to_bytes(4, "big") + b"\x01\x03" + data[half:]
    split = [first, second, *bodies[1:]]
    assert not any(fs.feed(b) for b in split)
    # then the next message qualifies again
    assert all(fs.feed(b) for b in pdus(store_rq(make_dataset())))
    assert fs.stored == 1
    # a C-STORE on a context where we are not the SCP, or for a non-storage class
    fs2, _, _ = fast(store, contexts={1: (CT, False)})
    assert not fs2.feed(pdus(store_rq(make_dataset()))[0])


def test_a_command_inside_a_dataset_aborts_and_leaves_nothing(store: Store) -> None:
    fs, assoc, _ = fast(store)
    bodies = pdus(store_rq(make_dataset(pixels=40_000)), 4096)
    assert fs.feed(bodies[0]) and fs.feed(bodies[1])
    assert len(list(store.objects.tmp.iterdir())) == 1
    assert fs.feed(pdus(store_rq(make_dataset()))[0])  # a new command mid-dataset
    assert assoc.dul.event_queue.get_nowait() == "Evt19"
    assert assoc.dul.socket.data == []
    assert list(store.objects.tmp.iterdir()) == []
    assert Instance.select().count() == 0


def test_malformed_pdv_items() -> None:
    assert faststore._items(memoryview(b"\x00\x00\x00\x01\x01")) is None
    assert faststore._items(memoryview(b"\x00\x00\x00\x09\x01\x02abc")) is None
    assert faststore._items(memoryview(b"")) is None
    assert faststore._items(memoryview(b"\x00\x00\x00\x03\x01\x02a")) == [(1, 2, 6, 7)]


def test_close_removes_an_unfinished_spool(store: Store) -> None:
    fs, _, _ = fast(store)
    assert fs.feed(pdus(store_rq(make_dataset(pixels=40_000)), 4096)[0])
    assert len(list(store.objects.tmp.iterdir())) == 1
    fs.close()
    assert list(store.objects.tmp.iterdir()) == []
