"""C-STORE sub-operations of C-MOVE and C-GET without pynetdicom's per-PDU send path.

pynetdicom sends a dataset as one P-DATA primitive per PDU: every 16 KB fragment (the PDU
size DCMTK and most workstations offer) is a Python object queued to the DUL thread,
turned into a P-DATA-TF PDU by its state machine and written with its own `send`. A
500 MB study is ~32,000 such round trips, and that, not TLS or hashing, bounded C-MOVE.

Here the sending thread frames the stored file's dataset bytes (everything after the
File Meta Information: stored objects are sent as stored) into P-DATA-TF PDUs of the
peer's maximum length itself, about 1 MiB of PDUs per buffer, and hands each buffer to
the DUL thread as one ordinary P-DATA primitive carrying a `_Frames` marker. The DUL
thread takes it through its state machine as usual (Sta6 + Evt9 -> DT-1: socket writes
stay in the one thread that owns the TLS socket, and the association's state stays
pynetdicom's), and a per-association hook on `dul._send` writes the pre-framed bytes
with one `sendall` instead of encoding a PDU. At most `IN_FLIGHT` buffers are queued, so
memory stays bounded whatever the object's size. The C-STORE-RQ command set is encoded
by hand (byte-identical to pynetdicom's, unit-tested); the C-STORE-RSP comes back
through pynetdicom's receive path, except that a plain one (all of it in one PDV) is
decoded by hand into the same primitive (`decode_store_rsp`, unit-tested against
pynetdicom's decoder) instead of by pydicom, then pynetdicom's status check.

The object must have been verified already (DESIGN §5: `store.open_verified` hashed
every byte before we read it again here); the file stays open, so what is sent is what
was verified. `Unsupported` is raised, before anything is sent, when the file cannot
take this path (no exactly matching accepted presentation context, unusual File Meta
Information); the caller then uses pynetdicom's own send_c_store.

The association's reactor is paused for the whole exchange, as pynetdicom's
send_c_store does, and is left paused between consecutive fast sub-operations (its
next look at the message queue would otherwise cost up to ASSOC_IDLE_WAIT per
sub-operation); `release()`, `abort()` and `kill()` all restart it, and `resume()` does
when an association ends any other way.
"""

from __future__ import annotations

import math
import struct
import threading
import time
from dataclasses import dataclass
from typing import IO, Any

from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

# Bytes of PDUs per buffer handed to the DUL thread, and how many may be queued.
BUFFER_BYTES = 1024 * 1024
IN_FLIGHT = 4
# Largest fragment we send when the peer accepts PDUs larger than this (or any: 0).
MAX_FRAGMENT = 1024 * 1024 - 6

# P-DATA-TF PDU with one PDV (PS3.8 9.3.5, E.2): PDU type, reserved, PDU length,
# PDV item length, presentation context ID, message control header.
_PDU = struct.Struct(">BBIIBB")
_HEADER = _PDU.size  # 12
_COMMAND_LAST, _DATA_MORE, _DATA_LAST = 0x03, 0x00, 0x02

_SHORT = struct.Struct("<HH2sH")
_META_READ = 8192
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC",
                       b"UN", b"UR", b"UT", b"UV"})


class Unsupported(Exception):
    """This object cannot be sent on the fast path; nothing has been sent."""


# --------------------------------------------------------------------------- file meta
@dataclass(frozen=True)
class FileMeta:
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    dataset_offset: int


def read_meta(f: IO[bytes]) -> FileMeta:
    """The three UIDs of a Part 10 file's group 0002 and where its dataset starts.

    Reads from offset 0 (one read for the usual group of a few hundred bytes); raises
    Unsupported for anything but a preamble, "DICM" and an Explicit VR Little Endian
    group 0002 (PS3.10 7.1).
    """
    f.seek(0)
    buf = f.read(_META_READ)
    if len(buf) < 132 or buf[128:132] != b"DICM":
        raise Unsupported("no Part 10 preamble")
    values: dict[int, bytes] = {}
    offset = 132
    eof = len(buf) < _META_READ
    while True:
        if not eof and offset + 12 + 4096 > len(buf):  # a long group: read on
            more = f.read(_META_READ)
            eof = len(more) < _META_READ
            buf += more
        if len(buf) < offset + 8:
            break
        group, element, vr, length = _SHORT.unpack_from(buf, offset)
        if group != 0x0002:
            break
        head_len = 8
        if vr in _LONG_VRS:
            if len(buf) < offset + 12:
                raise Unsupported("truncated file meta")
            (length,) = struct.unpack_from("<I", buf, offset + 8)
            head_len = 12
        if length > 4096 or offset > 65536:
            raise Unsupported("implausible file meta")
        value = buf[offset + head_len:offset + head_len + length]
        if len(value) != length:
            raise Unsupported("truncated file meta")
        values[element] = value
        offset += head_len + length
    try:
        uids = [values[e].rstrip(b"\0 ").decode("ascii") for e in (0x0002, 0x0003, 0x0010)]
    except (KeyError, UnicodeDecodeError):
        raise Unsupported("file meta lacks a UID") from None
    return FileMeta(uids[0], uids[1], uids[2], offset)


# --------------------------------------------------------------------------- command
def _element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, elem, len(value)) + value


def _ui(value: str) -> bytes:
    b = value.encode("ascii")
    return b + b"\0" if len(b) % 2 else b


def encode_store_rq(sop_class: str, sop_instance: str, message_id: int, priority: int = 2,
                    originator_aet: str | None = None,
                    originator_id: int | None = None) -> bytes:
    """The C-STORE-RQ command set with a Data Set following, Implicit VR Little Endian
    (PS3.7 9.3.1.1), as pynetdicom encodes it."""
    parts = [
        _element(0x0002, _ui(sop_class)),
        _element(0x0100, struct.pack("<H", 0x0001)),
        _element(0x0110, struct.pack("<H", message_id)),
        _element(0x0700, struct.pack("<H", priority)),
        _element(0x0800, struct.pack("<H", 0x0001)),
        _element(0x1000, _ui(sop_instance)),
    ]
    if originator_aet:
        aet = originator_aet.strip().encode("ascii")
        parts.append(_element(0x1030, aet + b" " if len(aet) % 2 else aet))
    if originator_id is not None:
        parts.append(_element(0x1031, struct.pack("<H", originator_id)))
    body = b"".join(parts)
    return _element(0x0000, struct.pack("<I", len(body))) + body


def encode_retrieve_pending(command_field: int, sop_class: str, message_id: int,
                            remaining: int, completed: int, failed: int,
                            warning: int) -> bytes:
    """A pending C-MOVE-RSP (0x8021) or C-GET-RSP (0x8010) command set without an
    Identifier, Implicit VR Little Endian (PS3.7 9.3.3.2, 9.3.4.2), as pynetdicom
    encodes the one it sends after each sub-operation."""
    us = struct.Struct("<H").pack
    body = b"".join([
        _element(0x0002, _ui(sop_class)),
        _element(0x0100, us(command_field)),
        _element(0x0120, us(message_id)),
        _element(0x0800, us(0x0101)),
        _element(0x0900, us(0xFF00)),
        _element(0x1020, us(remaining)),
        _element(0x1021, us(completed)),
        _element(0x1022, us(failed)),
        _element(0x1023, us(warning)),
    ])
    return _element(0x0000, struct.pack("<I", len(body))) + body


# --------------------------------------------------------------------------- response
# Elements a C-STORE-RSP command set may carry that decode_store_rsp understands; one with
# anything else (Error ID, ...) is decoded by pynetdicom.
_RSP_ELEMENTS = frozenset({0x0000, 0x0002, 0x0100, 0x0120, 0x0800, 0x0900, 0x0902, 0x1000})
_CMD_ELEMENT = struct.Struct("<HHI")
_US = struct.Struct("<H")


def decode_store_rsp(cmd: bytes) -> C_STORE | None:
    """The C-STORE-RSP primitive pynetdicom would decode from this command set (Implicit
    VR Little Endian), or None when it is anything else or anything unusual."""
    values: dict[int, bytes] = {}
    o, end = 0, len(cmd)
    while o < end:
        if o + 8 > end:
            return None
        group, elem, n = _CMD_ELEMENT.unpack_from(cmd, o)
        o += 8
        if group != 0x0000 or o + n > end or elem not in _RSP_ELEMENTS:
            return None
        values[elem] = bytes(cmd[o:o + n])
        o += n
    try:
        if (_US.unpack(values[0x0100])[0] != 0x8001
                or _US.unpack(values[0x0800])[0] != 0x0101):
            return None
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = _US.unpack(values[0x0120])[0]
        rsp.Status = _US.unpack(values[0x0900])[0]
        for elem, name in ((0x0002, "AffectedSOPClassUID"),
                           (0x1000, "AffectedSOPInstanceUID")):
            if elem in values:
                setattr(rsp, name, values[elem].rstrip(b"\0 ").decode("ascii") or None)
        if 0x0902 in values:
            rsp.ErrorComment = values[0x0902].rstrip(b"\0 ").decode("ascii")  # type: ignore[assignment]
    except (KeyError, struct.error, ValueError, TypeError):
        return None
    return rsp


def _install_rsp(dimse: Any) -> None:
    """Let this association's DIMSE take a C-STORE-RSP that arrives whole in one PDV
    without pynetdicom's pydicom decoding (idempotent); everything else is pynetdicom's."""
    if getattr(dimse, "_pacsd_rsp", False):
        return
    original = dimse.receive_primitive

    def receive(primitive: Any) -> None:
        pdvs = primitive.presentation_data_value_list
        if dimse.message is None and len(pdvs) == 1 and bytes(pdvs[0][1][:1]) == b"\x03":
            rsp = decode_store_rsp(pdvs[0][1][1:])
            if rsp is not None:
                dimse.msg_queue.put((pdvs[0][0], rsp))
                return
        original(primitive)

    dimse.receive_primitive = receive
    dimse._pacsd_rsp = True


# --------------------------------------------------------------------------- DUL hook
class _Frames:
    """Pre-framed P-DATA-TF PDUs riding through the DUL as one P-DATA primitive."""

    __slots__ = ("data", "slots")

    def __init__(self, data: bytearray, slots: threading.Semaphore) -> None:
        self.data = data
        self.slots = slots

    def __len__(self) -> int:  # PresentationDataValueItem.item_length asks
        return len(self.data)


def _install(dul: Any) -> None:
    """Let this DUL write `_Frames` as they are (idempotent, this association only)."""
    if getattr(dul, "_pacsd_frames", False):
        return
    original = dul._send

    def send(pdu: Any) -> None:
        items = getattr(pdu, "presentation_data_value_items", None)
        frames = items[0].presentation_data_value if items else None
        if type(frames) is not _Frames:
            original(pdu)
            return
        try:
            sock = getattr(dul.socket, "socket", None)
            if sock is None:
                return
            sock.sendall(frames.data)
        except Exception:
            dul.event_queue.put("Evt17")  # transport closed, as AssociationSocket.send
        finally:
            frames.data = bytearray()
            frames.slots.release()

    dul._send = send
    dul._pacsd_frames = True


def _alive(assoc: Any) -> bool:
    """Established, and its DUL still in data transfer (Sta6) with no abort waiting."""
    dul = assoc.dul
    try:
        return bool(assoc.is_established and not assoc.is_aborted and dul.is_alive()
                    and not getattr(dul, "_kill_thread", False)
                    and dul.state_machine.current_state == "Sta6"
                    and not assoc.acse.is_aborted())
    except Exception:
        return False


def resume(assoc: Any) -> None:
    """Restart the reactor of an association this module left paused, if it has ended
    (so its thread sees the release or abort and exits) — harmless otherwise."""
    if getattr(assoc, "_pacsd_paused", False) and not _alive(assoc):
        assoc._pacsd_paused = False
        assoc._reactor_checkpoint.set()


# --------------------------------------------------------------------------- send
def send_c_store(assoc: Any, f: IO[bytes], *, msg_id: int = 1, priority: int = 2,
                 originator_aet: str | None = None, originator_id: int | None = None,
                 ) -> Dataset:
    """pynetdicom's `Association.send_c_store(path, ...)` for a verified, open Part 10
    file, sent as stored. Returns the response status Dataset (empty when no response
    came; the association is then aborted, as pynetdicom does).

    Raises Unsupported before sending anything when the fast path cannot be used,
    RuntimeError when the association is not established, ConnectionError when it ends
    while the dataset is being sent.
    """
    if not assoc.is_established:
        raise RuntimeError("The association with a peer SCP must be established before "
                           "sending a C-STORE request")
    meta = read_meta(f)
    try:
        context = assoc._get_valid_context(meta.sop_class_uid, meta.transfer_syntax_uid,
                                           "scu", allow_conversion=False)
    except ValueError as exc:
        raise Unsupported(str(exc)) from None
    if str(context.transfer_syntax[0]) != meta.transfer_syntax_uid:
        raise Unsupported("accepted transfer syntax differs from the stored one")
    end = f.seek(0, 2)
    length = end - meta.dataset_offset
    f.seek(meta.dataset_offset)
    cmd = encode_store_rq(meta.sop_class_uid, meta.sop_instance_uid, msg_id, priority,
                          originator_aet, originator_id)
    peer_max = int(assoc.dimse.maximum_pdu_size or 0)
    fragment = MAX_FRAGMENT if peer_max == 0 else min(peer_max - 6, MAX_FRAGMENT)
    if fragment < len(cmd):
        raise Unsupported(f"peer maximum PDU length {peer_max} below the command set")

    dul = assoc.dul
    _install(dul)
    _install_rsp(assoc.dimse)
    in_reactor = threading.current_thread() is assoc
    if not in_reactor:
        assoc._reactor_checkpoint.clear()  # the reactor must not take our response
        assoc._pacsd_paused = True
    cx_id = int(context.context_id)
    slots = threading.Semaphore(IN_FLIGHT)
    sent = False
    try:
        for buf, last in _buffers(f, length, cx_id, fragment, cmd):
            if last and not in_reactor:
                # the response can only come after the last fragment: make sure the
                # reactor is paused before it can
                while not assoc._is_paused:
                    time.sleep(0.0001)
            _queue(assoc, dul, _Frames(buf, slots), cx_id, slots)
            sent = True
    except BaseException:
        if sent and _alive(assoc):
            # part of the message is out and the rest cannot follow: only an abort
            # leaves the peer in a defined state (PS3.8 7.3.1)
            assoc.abort()
        resume(assoc)
        raise
    _, rsp = assoc.dimse.get_msg(block=True)
    if rsp is None:  # DIMSE timeout or the peer went away
        assoc._pacsd_paused = False
        assoc._reactor_checkpoint.set()
        assoc._handle_no_response()
        return Dataset()
    if not in_reactor:
        resume(assoc)
    status: Dataset = assoc._check_received_status(rsp)
    return status


def _queue(assoc: Any, dul: Any, frames: _Frames, cx_id: int,
           slots: threading.Semaphore) -> None:
    while not slots.acquire(timeout=0.5):
        if not _alive(assoc):
            raise ConnectionError("association ended while sending a C-STORE dataset")
    if not _alive(assoc):
        slots.release()
        raise ConnectionError("association ended while sending a C-STORE dataset")
    pdata = P_DATA()
    # bypasses the list setter's bytes check, as pynetdicom's own encode_msg does
    pdata.presentation_data_value_list.append((cx_id, frames))  # type: ignore[arg-type]
    dul.send_pdu(pdata)


def _buffers(f: IO[bytes], length: int, cx_id: int, fragment: int, cmd: bytes):  # type: ignore[no-untyped-def]
    """Yield (buffer of P-DATA-TF PDUs, is_last): the command, then the dataset read
    from `f` (at the dataset's offset) in fragments of `fragment` bytes."""
    per_buffer = max(1, BUFFER_BYTES // fragment)
    chunk = per_buffer * fragment
    raw = bytearray(min(chunk, max(length, 1)))
    src = memoryview(raw)
    head = bytearray(_HEADER + len(cmd))
    _PDU.pack_into(head, 0, 0x04, 0, len(cmd) + 6, len(cmd) + 2, cx_id, _COMMAND_LAST)
    head[_HEADER:] = cmd
    remaining = length
    if remaining == 0:  # an empty dataset: one last, empty fragment
        out = head + _PDU.pack(0x04, 0, 6, 2, cx_id, _DATA_LAST)
        yield out, True
        return
    while remaining:
        want = min(chunk, remaining)
        _read_exact(f, src[:want])
        remaining -= want
        n = math.ceil(want / fragment)
        out = bytearray(len(head) + n * _HEADER + want)
        out[:len(head)] = head
        o = len(head)
        for i in range(n):
            a = i * fragment
            m = min(fragment, want - a)
            mch = _DATA_LAST if (not remaining and i == n - 1) else _DATA_MORE
            _PDU.pack_into(out, o, 0x04, 0, m + 6, m + 2, cx_id, mch)
            out[o + _HEADER:o + _HEADER + m] = src[a:a + m]
            o += _HEADER + m
        head = bytearray()
        yield out, not remaining


def _read_exact(f: IO[bytes], view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            # the verified file is held open, so this is not expected; the command is
            # already out, so the message cannot be completed
            raise ConnectionError("stored object shorter than when verified")
        got += n


__all__ = ["FileMeta", "Unsupported", "decode_store_rsp", "encode_retrieve_pending",
           "encode_store_rq", "read_meta", "resume", "send_c_store"]
