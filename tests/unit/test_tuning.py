"""The pynetdicom receive-path changes in scp/tuning.py stay equivalent to pynetdicom's own."""

from __future__ import annotations

import pytest
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket

from pacsd.scp import tuning


@pytest.mark.parametrize("comment", ["", "dataset SOP Instance UID differs", "odd"])
@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xA900, 0xC000])
def test_hand_encoded_store_rsp_equals_pynetdicom(comment: str, status: int) -> None:
    p = C_STORE()
    p.MessageIDBeingRespondedTo = 65535
    p.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    p.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    p.Status = status
    if comment:
        p.ErrorComment = comment
    msg = C_STORE_RSP()
    msg.primitive_to_message(p)
    ref = b"".join(x.presentation_data_value_list[0][1][1:] for x in msg.encode_msg(1, 16384))
    mine = tuning.encode_store_rsp(p.AffectedSOPClassUID, 65535, status,
                                   p.AffectedSOPInstanceUID, comment)
    assert mine == ref


def test_patched_pynetdicom_names_exist() -> None:
    """Guards an upgrade of pynetdicom: every method tuning.py replaces must still exist."""
    for cls, name in ((DULServiceProvider, "run_reactor"), (DULServiceProvider, "send_pdu"),
                      (DULServiceProvider, "kill_dul"), (Association, "_run_reactor"),
                      (AssociationSocket, "recv"), (DIMSEServiceProvider, "send_msg"),
                      (DULServiceProvider, "_read_pdu_data"),
                      (DULServiceProvider, "_decode_pdu")):
        assert callable(getattr(cls, name))
    for name in ("_process_recv_primitive", "_is_transport_event", "artim_timer",
                 "to_provider_queue", "event_queue", "_idle_timer", "_recv_pdu",
                 "state_machine"):
        assert name in DULServiceProvider.__init__.__code__.co_names or hasattr(
            DULServiceProvider, name), name


def test_fast_send_msg_produces_a_pdu_pynetdicom_encodes() -> None:
    """The fast path hands the DUL a P-DATA that pynetdicom's own PDU encoder accepts."""
    from pynetdicom.pdu import P_DATA_TF

    sent: list[object] = []

    class FakeDUL:
        def send_pdu(self, primitive: object) -> None:
            sent.append(primitive)

    class FakeProvider:
        dul = FakeDUL()

    p = C_STORE()
    p.MessageIDBeingRespondedTo = 3
    p.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    p.AffectedSOPInstanceUID = "1.2.3.4"
    p.Status = 0x0000
    tuning._send_msg(FakeProvider(), p, 5)
    (pdata,) = sent
    pdu = P_DATA_TF()
    pdu.from_primitive(pdata)
    raw = pdu.encode()
    assert raw[0] == 0x04  # P-DATA-TF
    assert raw.endswith(tuning.encode_store_rsp(p.AffectedSOPClassUID, 3, 0, "1.2.3.4"))


def test_context_copy_is_independent_and_equal_to_deepcopy() -> None:
    """Each association gets its own contexts, as with pynetdicom's deepcopy."""
    import copy

    from pynetdicom import transport

    from pacsd.app import build_ae
    from pacsd.config import Config

    tuning.apply()
    assert transport.deepcopy is tuning.copy_contexts  # what _create_association calls
    src = build_ae(Config()).supported_contexts
    mine, ref = tuning.copy_contexts(src), copy.deepcopy(src)
    assert [vars(c) for c in mine] == [vars(c) for c in ref]
    mine[0].transfer_syntax = ["1.2.840.10008.1.2"]
    mine[0].context_id = 7
    mine[0].result = 0
    assert src[0].transfer_syntax != ["1.2.840.10008.1.2"] and src[0].context_id is None
    assert src[0].result is None
    assert tuning.copy_contexts({"a": [1]}) == {"a": [1]}


def test_dul_wait_works_above_fd_setsize() -> None:
    """A worker with many connections has descriptors above 1024, where select() fails
    (issue 9): the DUL wait then returned at once, a busy loop. poll() waits properly."""
    import os
    import queue
    import resource
    import socket
    import time
    from types import SimpleNamespace

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1300:
        pytest.skip("cannot raise RLIMIT_NOFILE above 1300")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1300), hard))
    a, b = socket.socketpair()
    high = socket.socket(fileno=os.dup2(a.fileno(), 1200))
    pipe_r, wake_w = os.pipe()
    wake_r = os.dup2(pipe_r, 1201)
    os.close(pipe_r)
    try:
        dul = SimpleNamespace(socket=SimpleNamespace(socket=high, _is_connected=True),
                              to_provider_queue=queue.Queue())
        t0 = time.monotonic()
        tuning._wait_for_work(dul, wake_r)  # nothing to read: waits DUL_IDLE_WAIT
        assert time.monotonic() - t0 >= tuning.DUL_IDLE_WAIT * 0.8
        b.send(b"x")
        t0 = time.monotonic()
        for _ in range(50):  # readable: returns at once, every time
            tuning._wait_for_work(dul, wake_r)
        assert time.monotonic() - t0 < tuning.DUL_IDLE_WAIT * 5
    finally:
        high.detach()
        for fd in (1200, wake_r, wake_w):
            os.close(fd)
        a.close()
        b.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
