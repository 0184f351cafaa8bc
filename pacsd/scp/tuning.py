"""Receive-path changes to pynetdicom 3.0.x, applied once per worker by `app.py`.

pynetdicom's two per-association threads poll: the DUL thread sleeps 1 ms whenever it
finds nothing to do, and the association thread sleeps 1 ms before every look at its
message queue. Under load that is thousands of wake-ups a second per association,
each fighting for the GIL, plus up to 2 ms of latency added to every request/response
round trip. Its socket reads are 4 KiB at a time.

Here the DUL thread instead waits on the socket and on a wake-up pipe that `send_pdu`
and `kill_dul` write to, so it runs exactly when there is work; the association thread
blocks on its message queue; and the socket is read with `recv_into` in one buffer of
the whole PDU. The loops below are pynetdicom 3.0.4's own with only the waiting
changed (setup.cfg pins pynetdicom <3.1; `tests/unit/test_tuning.py` checks the
patched names still exist).
"""

from __future__ import annotations

import contextlib
import copy
import os
import queue
import select
import socket
import ssl
import struct
import time
from typing import Any

from pynetdicom import evt, transport
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket

# Longest the DUL thread sleeps without an event: bounds how late the ARTIM and idle
# timers and events queued by other threads (e.g. a local abort) are noticed.
DUL_IDLE_WAIT = 0.02
# Longest the association thread blocks on its message queue before it checks for
# release, abort and the network timeout.
ASSOC_IDLE_WAIT = 0.01

_applied = False


def apply() -> None:
    """Install the changes (idempotent)."""
    global _applied
    if _applied:
        return
    DULServiceProvider.run_reactor = _dul_run_reactor  # type: ignore[method-assign]
    DULServiceProvider.send_pdu = _dul_send_pdu  # type: ignore[method-assign]
    DULServiceProvider.kill_dul = _dul_kill  # type: ignore[method-assign]
    Association._run_reactor = _assoc_run_reactor  # type: ignore[method-assign]
    AssociationSocket.recv = _socket_recv  # type: ignore[method-assign]
    DULServiceProvider._read_pdu_data = _read_pdu_data  # type: ignore[method-assign]
    DIMSEServiceProvider.send_msg = _send_msg  # type: ignore[method-assign]
    transport.deepcopy = copy_contexts  # type: ignore[attr-defined,assignment]
    _applied = True


def fix_reactor_race() -> None:
    """Only the association-thread change, for pynetdicom *clients* in other processes
    (the test suite's): pynetdicom 3.0.4's reactor can take the response meant for a
    send_c_find()/send_c_store() it was asked to pause for (it checks the pause flag, the
    request goes out, the answer arrives, then it reads the queue), and the caller then
    sees an empty status. A node that answers within microseconds makes that visible
    (1 C-FIND in ~600 in a 32-association burst). `_assoc_run_reactor` hands such an
    item back."""
    Association._run_reactor = _assoc_run_reactor  # type: ignore[method-assign]


# --------------------------------------------------------------------------- DUL thread


def _wake(dul: Any) -> None:
    fd = getattr(dul, "_pacsd_wake_w", None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.write(fd, b"\0")


_original_send_pdu = DULServiceProvider.send_pdu
_original_kill = DULServiceProvider.kill_dul


def _dul_send_pdu(self: Any, primitive: Any) -> None:
    _original_send_pdu(self, primitive)
    _wake(self)


def _dul_kill(self: Any) -> None:
    _original_kill(self)
    _wake(self)


def _wait_for_work(dul: Any, wake_r: int) -> None:
    """Block until the socket is readable, someone queued a primitive, or the idle wait."""
    assoc_sock = dul.socket
    raw = getattr(assoc_sock, "socket", None)
    if raw is None or not getattr(assoc_sock, "_is_connected", False):
        time.sleep(0.001)
        return
    if isinstance(raw, ssl.SSLSocket) and raw.pending():
        return
    if not dul.to_provider_queue.empty():
        return
    # poll(), not select(): a busy worker's descriptors may exceed FD_SETSIZE (1024)
    poller = getattr(dul, "_pacsd_poller", None)
    try:
        if poller is None or poller[0] is not raw:
            p = select.poll()
            p.register(raw, select.POLLIN)
            p.register(wake_r, select.POLLIN)
            dul._pacsd_poller = poller = (raw, p)
        ready = poller[1].poll(DUL_IDLE_WAIT * 1000)
    except (OSError, ValueError):
        return  # the socket went away; the reactor's own checks will see it
    if any(fd == wake_r for fd, _ in ready):
        with contextlib.suppress(BlockingIOError):
            os.read(wake_r, 4096)


def _dul_run_reactor(self: Any) -> None:
    """pynetdicom's DULServiceProvider.run_reactor, waiting instead of sleep-polling."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    self._pacsd_wake_w = wake_w
    try:
        _dul_loop(self, wake_r)
    finally:
        self._pacsd_wake_w = None
        self._pacsd_poller = None
        os.close(wake_r)
        os.close(wake_w)


def _dul_loop(self: Any, wake_r: int) -> None:
    self._idle_timer.start()
    sleep = False
    while True:
        # scp/sender.SocketLease: a C-MOVE sender may take this socket between two
        # iterations (this thread then parks here, touching nothing, until it is back)
        lease = getattr(self, "_pacsd_lease", None)
        if lease is not None:
            lease.dul_yield(self)
        if not self.assoc._dul_ready.is_set():
            self.assoc._dul_ready.set()
            sleep = True
        if sleep:
            _wait_for_work(self, wake_r)
        if self._kill_thread:
            break
        if self.artim_timer.expired:
            self.event_queue.put("Evt18")
        try:
            if self._process_recv_primitive():
                pass
            elif self._is_transport_event():
                self._idle_timer.restart()
        except Exception:
            abort_pdu = A_ABORT_RQ()
            abort_pdu.source = 0x02
            abort_pdu.reason_diagnostic = 0x00
            with contextlib.suppress(Exception):
                self.socket.send(abort_pdu.encode())
            self.assoc.is_aborted = True
            self.assoc.is_established = False
            self.assoc._kill = True
            self._kill_thread = True
            return
        try:
            event = self.event_queue.get(block=False)
        except queue.Empty:
            sleep = True
            continue
        self.state_machine.do_action(event)
        sleep = False


# --------------------------------------------------------------------------- association


def _assoc_run_reactor(self: Any) -> None:
    """pynetdicom's Association._run_reactor, blocking on the message queue."""
    self._is_paused = False
    msg_queue = self.dimse.msg_queue
    while not self._kill:
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False
        try:
            item = msg_queue.get(timeout=ASSOC_IDLE_WAIT)
        except queue.Empty:
            item = None
        if item is not None and not self._reactor_checkpoint.is_set():
            # a send_*() paused us while we waited (it saw _is_paused before we cleared
            # it): the item is its response, or the (None, None) an abort puts there to
            # wake it; hand it back (scp/qr.py C-MOVE)
            with msg_queue.mutex:
                msg_queue.queue.appendleft(item)
                msg_queue.not_empty.notify()
            continue
        context_id, msg = item if item is not None else (0, None)
        if msg:
            self._serve_request(msg, int(context_id))
        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return
        if self.acse.is_aborted():
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return
        if not self.dul.is_alive():
            self.kill()
            return
        if self.dul.idle_timer_expired():
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return


# --------------------------------------------------------------------------- contexts


def copy_contexts(obj: Any, memo: Any = None) -> Any:
    """What pynetdicom's RequestHandler deep-copies for every association: the server's
    supported presentation contexts (178 of them, up to 45 transfer syntaxes here), which cost
    0.3 to 0.8 s of a worker's CPU per association through `copy.deepcopy`. A context's
    attributes are immutable (UIDs, bools, ints) but for its transfer syntax list, so a
    shallow copy of each with its own list is equivalent. Anything else is deep-copied."""
    if isinstance(obj, list) and all(type(c) is PresentationContext for c in obj):
        out = []
        for cx in obj:
            new = PresentationContext.__new__(PresentationContext)
            new.__dict__.update(cx.__dict__)
            new._transfer_syntax = list(cx._transfer_syntax)
            out.append(new)
        return out
    return copy.deepcopy(obj, memo)


# --------------------------------------------------------------------------- PDU reader


def _read_pdu_data(self: Any) -> None:
    """pynetdicom's DULServiceProvider._read_pdu_data, offering each P-DATA-TF PDU of an
    established association to its C-STORE fast path (scp/faststore.py) first."""
    sock = self.socket
    try:
        header = sock.recv(6)
    except (OSError, TimeoutError):
        self.event_queue.put("Evt17")  # READ_PDU_EXC_A: connection closed
        return
    if len(header) != 6:
        self.event_queue.put("Evt17")  # READ_PDU_EXC_B
        return
    pdu_type, _, pdu_length = struct.unpack(">BBL", header)
    if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
        self.event_queue.put("Evt19")  # READ_PDU_EXC_C: unknown PDU type
        return
    try:
        body = sock.recv(pdu_length)
    except (OSError, TimeoutError):
        self.event_queue.put("Evt17")  # READ_PDU_EXC_D
        return
    if len(body) != pdu_length:
        self.event_queue.put("Evt17")  # READ_PDU_EXC_E: short PDU
        return
    fast = getattr(self.assoc, "pacsd_fast", None)
    if (pdu_type == 0x04 and fast is not None
            and self.state_machine.current_state == "Sta6" and fast.feed(body)):
        return
    try:
        pdu, event = self._decode_pdu(header + body)
        self.event_queue.put(event)
    except Exception:
        self.event_queue.put("Evt19")  # READ_PDU_EXC_F: undecodable
        return
    self._recv_pdu.put(pdu)


# --------------------------------------------------------------------------- socket


# Senders that leave Nagle's algorithm on (DCMTK and most modality stacks unless
# TCP_NODELAY=1) hold their next small segment until we ACK the previous one; with the
# kernel's delayed ACK that is ~40 ms per message. TCP_QUICKACK makes us ACK at once; the
# kernel clears it again after a while, so it is re-armed after every read.
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


def _quickack(sock: Any) -> None:
    if _QUICKACK is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)


# Largest PDU other than P-DATA-TF we read (an A-ASSOCIATE-RQ with 128 contexts and a
# user identity fits easily); P-DATA-TF is held to our advertised maximum PDU length.
MAX_CONTROL_PDU = 256 * 1024


class PDUTooLarge(OSError):
    """A peer announced a PDU longer than we accept; pynetdicom closes the connection."""


def _check_pdu_length(self: Any, nr_bytes: int) -> None:
    """Refuse to allocate a PDU body beyond the limits (issue 9: a 6-byte header
    announcing 4 GiB made the worker allocate 4 GiB)."""
    header, self._pacsd_header = getattr(self, "_pacsd_header", None), None
    if header is None:
        return
    pdu_type, _, length = struct.unpack(">BBL", header)
    if length != nr_bytes:
        return
    limit = MAX_CONTROL_PDU
    if pdu_type == 0x04:
        limit = int(getattr(getattr(self.assoc, "ae", None), "maximum_pdu_size", 0) or 0)
    if limit and nr_bytes > limit:
        from pacsd.scp import limits

        limits.refused(self.assoc, "pdu_size", f"PDU type 0x{pdu_type:02X} of {nr_bytes} "
                       f"bytes exceeds {limit}")
        raise PDUTooLarge(f"PDU type 0x{pdu_type:02X} of {nr_bytes} bytes exceeds {limit}")


def _socket_recv(self: Any, nr_bytes: int) -> bytearray:
    """Read exactly nr_bytes (fewer only when the peer closed) into one buffer.

    The whole PDU must arrive within network_timeout (the socket's own timeout bounds
    each wait): a peer trickling a byte a second must not hold the association forever.
    """
    _check_pdu_length(self, nr_bytes)
    timeout = getattr(self.assoc, "network_timeout", None)
    deadline = None if timeout is None else time.monotonic() + timeout
    buf = bytearray(nr_bytes)
    view = memoryview(buf)
    got = 0
    sock = self.socket
    while got < nr_bytes:
        if got and deadline is not None and time.monotonic() > deadline:
            del view
            raise TimeoutError(f"PDU not received within {timeout} s ({got}/{nr_bytes})")
        n = sock.recv_into(view[got:], nr_bytes - got)
        _quickack(sock)
        if not n:
            del view
            return buf[:got]
        got += n
    del view
    if nr_bytes == 6:
        self._pacsd_header = bytes(buf)
    return buf


# --------------------------------------------------------------------------- C-STORE-RSP

_original_send_msg = DIMSEServiceProvider.send_msg


def _element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, elem, len(value)) + value


def _ui(value: str) -> bytes:
    b = value.encode("ascii")
    return b + b"\0" if len(b) % 2 else b


def encode_store_rsp(sop_class: str, message_id: int, status: int, sop_instance: str,
                     error_comment: str = "") -> bytes:
    """The C-STORE-RSP command set, Implicit VR Little Endian (PS3.7 9.3.1.2), by hand.

    pydicom builds, validates and encodes a Dataset for every response (about a fifth
    of the per-instance CPU); these eight elements never change shape.
    """
    body = b"".join([
        _element(0x0002, _ui(sop_class)),
        _element(0x0100, struct.pack("<H", 0x8001)),
        _element(0x0120, struct.pack("<H", message_id)),
        _element(0x0800, struct.pack("<H", 0x0101)),
        _element(0x0900, struct.pack("<H", status)),
    ])
    if error_comment:
        c = error_comment.encode("ascii", "replace")[:64]
        body += _element(0x0902, c + b" " if len(c) % 2 else c)
    body += _element(0x1000, _ui(sop_instance))
    return _element(0x0000, struct.pack("<I", len(body))) + body


def _send_msg(self: Any, primitive: Any, context_id: int) -> None:
    if (
        type(primitive) is C_STORE
        and primitive.MessageIDBeingRespondedTo is not None
        and getattr(primitive, "OffendingElement", None) is None
        and getattr(primitive, "ErrorID", None) is None
        and primitive.Status is not None
    ):
        cmd = encode_store_rsp(
            str(primitive.AffectedSOPClassUID or ""),
            int(primitive.MessageIDBeingRespondedTo),
            int(primitive.Status),
            str(primitive.AffectedSOPInstanceUID or ""),
            str(primitive.ErrorComment or ""),
        )
        pdata = P_DATA()
        # a list, not a tuple: pynetdicom 3.0.4 raises TypeError for tuples (every C-STORE-RSP)
        pdata.presentation_data_value_list = [[context_id, b"\x03" + cmd]]  # type: ignore[list-item]
        self.dul.send_pdu(pdata)
        return
    _original_send_msg(self, primitive, context_id)


__all__ = ["apply", "encode_store_rsp"]
