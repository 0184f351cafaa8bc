"""C-STORE sub-operations of C-MOVE and C-GET without pynetdicom's per-PDU send path.

pynetdicom sends a dataset as one P-DATA primitive per PDU: every 16 KB fragment (the PDU
size DCMTK and most workstations offer) is a Python object queued to the DUL thread,
turned into a P-DATA-TF PDU by its state machine and written with its own `send`. A
500 MB study is ~32,000 such round trips, and that, not TLS or hashing, bounded C-MOVE.

Here the dataset bytes (everything after the File Meta Information: stored objects are
sent as stored) are framed by us into P-DATA-TF PDUs of the peer's maximum length, two
ways:
- Prepared: a plain object of at most PREPARE_MAX bytes is read once, with one scatter
  read straight into its PDUs, by store/retrieve.VerifyAhead's background thread before
  it is needed (preparing it in the sending thread while it waits for the previous
  response was measured slower: 120.8 vs 181.5 MB/s, docs/query.md); `Framer`
  (fixed per association: fragment size, context per SOP class) lays out one buffer
  with room in front for the command PDU, and the framed bytes themselves are hashed:
  what is sent is exactly what was verified, and nothing is read twice.
- streamed: larger and encrypted objects are framed from their verified open file,
  about 1 MiB of PDUs per buffer (memory bounded whatever the size).
The C-STORE-RQ command set is encoded by hand (byte-identical to pynetdicom's,
unit-tested); a plain C-STORE-RSP (all of it in one PDV) is decoded by hand into the
primitive pynetdicom's decoder would make (`decode_store_rsp`, unit-tested), then
pynetdicom's status check.

Who writes and reads. On a C-MOVE sub-association (`direct=True`: its peer only
answers), the sending thread writes the PDUs and reads the C-STORE-RSP itself: it takes
the association's `SocketLease`, which parks the DUL reactor at the top of its loop
(scp/tuning.py calls `dul_yield` there), so the TLS socket is never used by two threads
at once, and keeps it from one sub-operation to the next (no thread hand-over per
sub-operation). The response is read with the DUL's own `_read_pdu_data` (same limits,
timeouts and errors), whose `pacsd_fast` hook gives us the plain C-STORE-RSP we wait for;
anything else (A-ABORT, A-RELEASE-RQ, an unusual response) is queued for the reactor as
usual, the lease is handed back and pynetdicom takes it from there. A `send_pdu` or
`kill_dul` of the association (release, abort) revokes a kept lease; the DIMSE timeout
is honoured while waiting for the response. Elsewhere (C-GET: the requester may send a
C-CANCEL any time) the buffers go through the DUL thread as one ordinary P-DATA
primitive carrying `scp/frames.Frames` (Sta6 + Evt9 -> DT-1), which the DUL writes with
one `sendall`; at most `IN_FLIGHT` buffers are queued.

The object must have been verified already (DESIGN §5): a Prepared one by its framed
bytes, a file by `store.open_verified`, which keeps it open, so what is sent is what was
verified. `Unsupported` is raised, before anything is sent, when an object cannot take
this path (no exactly matching accepted presentation context, unusual File Meta
Information); the caller then uses pynetdicom's own send_c_store.

The association's reactor is paused for the whole exchange, as pynetdicom's
send_c_store does, and is left paused between consecutive fast sub-operations (its
next look at the message queue would otherwise cost up to ASSOC_IDLE_WAIT per
sub-operation); `release()`, `abort()` and `kill()` all restart it, and `resume()` does
when an association ends any other way.
"""

from __future__ import annotations

import math
import os
import select
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, Any

from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import C_STORE

from pacsd.scp import frames

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
    while True:
        try:
            return parse_meta(buf, whole=len(buf) % _META_READ != 0 or not buf)
        except _ReadOn:
            more = f.read(_META_READ)
            buf += more
            if len(more) < _META_READ:
                return parse_meta(buf, whole=True)


class _ReadOn(Exception):
    """parse_meta needs more of the file than it was given."""


def parse_meta(buf: bytes | bytearray | memoryview, whole: bool = True) -> FileMeta:
    """read_meta on bytes: the start of the file (`whole`: or all of it).

    Raises Unsupported as read_meta does (_ReadOn when not `whole` and the group may go
    on past `buf`).
    """
    if len(buf) < 132 or bytes(buf[128:132]) != b"DICM":
        raise Unsupported("no Part 10 preamble")
    values: dict[int, bytes] = {}
    offset = 132
    while True:
        if not whole and offset + 12 + 4096 > len(buf):  # a long group: read on
            raise _ReadOn
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
        value = bytes(buf[offset + head_len:offset + head_len + length])
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


def decode_store_rsp(cmd: bytes | memoryview) -> C_STORE | None:
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
        # the UIDs are only carried along (the status check does not read them): set
        # as plain str, without pynetdicom's and pydicom's per-UID regex validation,
        # which was most of a decode's cost
        for elem, name in ((0x0002, "_affected_sop_class_uid"),
                           (0x1000, "_affected_sop_instance_uid")):
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


# --------------------------------------------------------------------------- socket lease
class SocketLease:
    """Turns at one association's socket between its DUL reactor thread and one sender.

    An OpenSSL connection must never be read and written by two threads at once, so
    whoever touches the TLS socket holds the turn. The reactor holds it except while it
    is parked in `dul_yield`, which scp/tuning.py's DUL loop calls at the top of every
    iteration. A sender asks with `begin()` (the reactor is woken, finishes its iteration
    and parks), writes its PDUs and reads the response itself, and `end(keep=True)` keeps
    the turn for its next sub-operation, so consecutive sub-operations cost no thread
    hand-over at all. Anything else the reactor must do revokes a kept turn: `revoke()`
    (called after every `send_pdu` and `kill_dul` of the association: release, abort)
    hands it back at once, or at the end of an exchange in progress; a turn kept idle
    longer than `idle_reclaim` seconds, or a DUL told to stop, takes it back anyway.
    """

    def __init__(self, wake: Callable[[], None], idle_reclaim: float = 2.0) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._wake = wake
        self.idle_reclaim = idle_reclaim
        self._sender = False  # a sender holds the turn ...
        self._busy = False  # ... and is inside an exchange
        self._wanted = False  # a sender waits for the reactor to park
        self._revoked = False  # give the turn back when the exchange ends
        self._parked = False  # the reactor waits in dul_yield
        self._since = 0.0  # when the sender's last exchange ended
        self.poller: tuple[Any, Any] | None = None  # the sender's poll() on the socket

    @property
    def held(self) -> bool:
        """A sender holds the turn (inside an exchange or kept between two)."""
        return self._sender

    # -- the reactor's side
    def dul_yield(self, dul: Any) -> None:
        """Called by the DUL thread where it touches nothing: parks it while a sender
        holds the turn or asks for it; returns at once otherwise."""
        if not (self._wanted or self._sender):  # the common case, without the lock
            return
        with self._cv:
            self._parked = True
            self._cv.notify_all()
            try:
                while self._wanted or self._sender:
                    if self._sender and not self._busy and (
                            getattr(dul, "_kill_thread", False)
                            or time.monotonic() - self._since > self.idle_reclaim):
                        self._give_back()
                        break
                    self._cv.wait(0.25)
            finally:
                self._parked = False

    # -- a sender's side
    def begin(self, alive: Callable[[], bool], timeout: float = 30.0) -> None:
        """Take the turn (or go on with a kept one); raises ConnectionError when the
        reactor is gone or does not park within `timeout` seconds."""
        with self._cv:
            if self._sender:
                self._busy = True
                return
            self._wanted = True
            deadline = time.monotonic() + timeout
            try:
                self._wake()
                while not self._parked:
                    if not alive() or time.monotonic() > deadline:
                        raise ConnectionError("association ended before its socket was free")
                    self._cv.wait(0.05)
                    if not self._parked:
                        self._wake()
                self._sender = self._busy = True
                self._revoked = False
            finally:
                self._wanted = False
                self._cv.notify_all()

    def end(self, keep: bool) -> None:
        """The exchange is over: keep the turn for the next one, or hand it back (and
        wake the reactor: what the sender queued for it must not wait for its poll)."""
        with self._cv:
            self._busy = False
            self._since = time.monotonic()
            if keep and not self._revoked:
                return
            self._give_back()
        self._wake()

    def revoke(self) -> None:
        """The reactor has work: hand a kept turn back (now, or when the exchange ends)."""
        if not self._sender:
            return
        with self._cv:
            if not self._sender:
                return
            if self._busy:
                self._revoked = True
            else:
                self._give_back()

    def _give_back(self) -> None:
        self._sender = self._busy = self._revoked = False
        self._cv.notify_all()


class _RspTaker:
    """The association's `pacsd_fast` hook (scp/tuning._read_pdu_data offers it every
    P-DATA-TF PDU first): takes the one C-STORE-RSP a sender waits for, in the thread
    that waits for it, when it is plain (one PDV, whole command set); else declines."""

    __slots__ = ("cx_id", "msg_id", "rsp", "thread")

    def __init__(self) -> None:
        self.thread = 0
        self.cx_id = self.msg_id = -1
        self.rsp: C_STORE | None = None

    def feed(self, body: bytearray) -> bool:
        if self.thread != threading.get_ident() or len(body) < 6:
            return False
        (n,) = _U32.unpack_from(body, 0)
        if n + 4 != len(body) or body[4] != self.cx_id or body[5] != _COMMAND_LAST:
            return False
        rsp = decode_store_rsp(memoryview(body)[6:])
        if rsp is None or rsp.MessageIDBeingRespondedTo != self.msg_id:
            return False
        self.rsp = rsp
        return True


_U32 = struct.Struct(">I")


def _lease(assoc: Any) -> SocketLease | None:
    """This association's socket lease (installed once), or None when it cannot have
    one (another `pacsd_fast` hook, e.g. the C-STORE receive path, owns its reads)."""
    dul = assoc.dul
    lease: SocketLease | None = getattr(dul, "_pacsd_lease", None)
    if lease is not None:
        return lease
    if getattr(assoc, "pacsd_fast", None) is not None or not hasattr(dul, "_pacsd_wake_w"):
        return None
    from pacsd.scp import tuning

    lease = SocketLease(lambda: tuning._wake(dul))
    send_pdu, kill_dul = dul.send_pdu, dul.kill_dul

    def send_pdu_revoking(primitive: Any) -> None:
        send_pdu(primitive)
        lease.revoke()

    def kill_revoking() -> None:
        kill_dul()
        lease.revoke()

    dul.send_pdu = send_pdu_revoking
    dul.kill_dul = kill_revoking
    _install_rsp(assoc.dimse)  # for a response the reactor reads after all
    assoc.pacsd_fast = _RspTaker()
    dul._pacsd_lease = lease  # last: from here on the reactor honours it
    return lease


# --------------------------------------------------------------------------- prepared
# Objects up to this size are read whole, hashed and framed ahead (store/retrieve.py
# VerifyAhead, in its own thread); larger ones are streamed from their verified file.
PREPARE_MAX = 8 * 1024 * 1024
# Bytes kept free in front of a prepared dataset for the C-STORE-RQ command PDU (its
# message ID is only known when it is sent); a command that does not fit goes alone.
HEADROOM = 512


class Prepared:
    """One verified object framed for one association: `frames[:end]` holds HEADROOM
    spare bytes, then the dataset as P-DATA-TF PDUs — the very bytes that were hashed."""

    __slots__ = ("context_id", "end", "frames", "meta", "owner", "pool")

    def __init__(self, meta: FileMeta, context_id: int, frames: bytearray, owner: object,
                 end: int | None = None, pool: _Pool | None = None) -> None:
        self.meta = meta
        self.context_id = context_id
        self.frames = frames
        self.end = len(frames) if end is None else end
        self.owner = owner
        self.pool = pool

    def with_command(self, cmd: bytes) -> list[memoryview | bytes]:
        """What to send: the command PDU and the dataset PDUs (one buffer when the
        command fits in the headroom)."""
        pdu = _PDU.pack(0x04, 0, len(cmd) + 6, len(cmd) + 2, self.context_id,
                        _COMMAND_LAST) + cmd
        data = memoryview(self.frames)
        if len(pdu) > HEADROOM:
            return [pdu, data[HEADROOM:self.end]]
        start = HEADROOM - len(pdu)
        data[start:HEADROOM] = pdu
        return [data[start:self.end]]

    def recycle(self) -> None:
        """Sent and answered: its buffer may frame a later object (no new allocation,
        zero-fill and page faults per object). Only once no write of it is pending."""
        buf, self.frames = self.frames, bytearray()
        if self.pool is not None and buf:
            self.pool.give(buf)

    def close(self) -> None:
        self.frames = bytearray()


class _Pool:
    """A few frame buffers for reuse (bounded; any thread may give or take)."""

    def __init__(self, keep: int = 4) -> None:
        self._lock = threading.Lock()
        self._free: list[bytearray] = []
        self.keep = keep

    def take(self, n: int) -> bytearray:
        with self._lock:
            for i, b in enumerate(self._free):
                if n <= len(b) <= 2 * n:
                    return self._free.pop(i)
        return bytearray(n)

    def give(self, b: bytearray) -> None:
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(b)


def framed_size(length: int, fragment: int, headroom: int = HEADROOM) -> int:
    """Bytes `layout` needs for a dataset of `length` bytes."""
    return headroom + max(1, math.ceil(length / fragment)) * _HEADER + length


def layout(out: bytearray, length: int, cx_id: int, fragment: int,
           headroom: int = HEADROOM) -> list[memoryview]:
    """Write into `out` (at least framed_size bytes) the P-DATA-TF PDU headers for a
    dataset of `length` bytes in fragments of at most `fragment` bytes, after `headroom`
    bytes; return the views of the fragments' slots, in order, for the dataset's bytes."""
    n = max(1, math.ceil(length / fragment))
    view = memoryview(out)
    views = []
    o = headroom
    for i in range(n):
        m = min(fragment, length - i * fragment)
        _PDU.pack_into(out, o, 0x04, 0, m + 6, m + 2, cx_id,
                       _DATA_LAST if i == n - 1 else _DATA_MORE)
        o += _HEADER
        views.append(view[o:o + m])
        o += m
    return views


def frame(data: memoryview, cx_id: int, fragment: int, headroom: int = HEADROOM,
          ) -> tuple[bytearray, list[memoryview]]:
    """`data` (a dataset) as P-DATA-TF PDUs of at most `fragment` bytes of it each, after
    `headroom` free bytes; and views of each fragment inside that buffer, in order (their
    concatenation is `data`: what a hash of the sent bytes must cover)."""
    out = bytearray(framed_size(len(data), fragment, headroom))
    views = layout(out, len(data), cx_id, fragment, headroom)
    o = 0
    for v in views:
        v[:] = data[o:o + len(v)]
        o += len(v)
    return out, views


_IOV_MAX = 1024  # buffers per preadv call (Linux's IOV_MAX)
_HEAD_READ = 8192
_HEAD_MAX = 65536 + 12 + 4096 + 8  # parse_meta refuses a group element beyond 64 KiB


def read_into(fd: int, views: list[memoryview], offset: int) -> int:
    """Fill `views` from `fd` at `offset` with scatter reads (one preadv for up to
    IOV_MAX buffers); the bytes read (fewer only at the end of the file)."""
    got = 0
    pending = [v for v in views if len(v)]
    while pending:
        n = os.preadv(fd, pending[:_IOV_MAX], offset + got)
        if not n:
            break
        got += n
        i = 0
        while i < len(pending) and n >= len(pending[i]):
            n -= len(pending[i])
            i += 1
        pending = pending[i:]
        if n:
            pending[0] = pending[0][n:]
    return got


class Framer:
    """Frames whole Part 10 objects for one association (VerifyAhead calls it in its
    thread): the fragment size and the presentation context per (SOP class, transfer
    syntax) are fixed once the association is established."""

    def __init__(self, assoc: Any) -> None:
        self.owner = assoc
        peer_max = int(assoc.dimse.maximum_pdu_size or 0)
        self.fragment = MAX_FRAGMENT if peer_max == 0 else min(peer_max - 6, MAX_FRAGMENT)
        self._contexts: dict[tuple[str, str], int | None] = {}
        self.pool = _Pool()

    def context_id(self, meta: FileMeta) -> int | None:
        key = (meta.sop_class_uid, meta.transfer_syntax_uid)
        if key not in self._contexts:
            self._contexts[key] = _exact_context(self.owner, meta)
        return self._contexts[key]

    def __call__(self, fd: int, size: int) -> tuple[Prepared, list[memoryview]] | None:
        """Read the Part 10 file `fd` of `size` bytes straight into the PDUs that carry
        its dataset: (the framed object, the pieces whose concatenation is what was read
        of the whole file: what to hash), or None when it cannot be sent framed (no
        exact context, odd meta)."""
        if self.fragment < 512:
            return None
        head = os.pread(fd, min(size, _HEAD_READ), 0)
        try:
            try:
                meta = parse_meta(head, whole=len(head) >= size)
            except _ReadOn:
                head = os.pread(fd, min(size, _HEAD_MAX), 0)
                meta = parse_meta(head, whole=True)
        except Unsupported:
            return None
        cx_id = self.context_id(meta)
        if cx_id is None:
            return None
        offset = meta.dataset_offset
        length = max(0, size - offset)
        n = framed_size(length, self.fragment)
        buf = self.pool.take(n)
        views = layout(buf, length, cx_id, self.fragment)
        got = read_into(fd, views, offset)
        if got < length:  # the file is shorter than it was: hash what there is
            views = _cut(views, got)
        return (Prepared(meta, cx_id, buf, self.owner, n, self.pool),
                [memoryview(head)[:offset], *views])


def _cut(views: list[memoryview], n: int) -> list[memoryview]:
    out = []
    for v in views:
        if n <= 0:
            break
        out.append(v[:n])
        n -= len(v)
    return out


def _exact_context(assoc: Any, meta: FileMeta) -> int | None:
    try:
        context = assoc._get_valid_context(meta.sop_class_uid, meta.transfer_syntax_uid,
                                           "scu", allow_conversion=False)
    except ValueError:
        return None
    if str(context.transfer_syntax[0]) != meta.transfer_syntax_uid:
        return None
    return int(context.context_id)


# --------------------------------------------------------------------------- send
def send_c_store(assoc: Any, f: IO[bytes] | Prepared, *, msg_id: int = 1,
                 priority: int = 2, originator_aet: str | None = None,
                 originator_id: int | None = None, direct: bool = False) -> Dataset:
    """pynetdicom's `Association.send_c_store(path, ...)` for a verified, open Part 10
    file (or a Prepared one), sent as stored. Returns the response status Dataset (empty
    when no response came; the association is then aborted, as pynetdicom does).

    `direct`: this thread writes the PDUs and reads the response itself, holding the
    association's SocketLease (a C-MOVE sub-association: its peer only answers);
    otherwise they go through the DUL thread.

    Raises Unsupported before sending anything when the fast path cannot be used,
    RuntimeError when the association is not established, ConnectionError when it ends
    while the dataset is being sent.
    """
    if not assoc.is_established:
        raise RuntimeError("The association with a peer SCP must be established before "
                           "sending a C-STORE request")
    buffers: Iterable[bytes | memoryview | bytearray]
    if isinstance(f, Prepared):
        if f.owner is not assoc:
            raise Unsupported("framed for another association")
        meta, cx_id = f.meta, f.context_id
        cmd = encode_store_rq(meta.sop_class_uid, meta.sop_instance_uid, msg_id, priority,
                              originator_aet, originator_id)
        buffers = f.with_command(cmd)
    else:
        meta = read_meta(f)
        found = _exact_context(assoc, meta)
        if found is None:
            raise Unsupported("no accepted context with the stored transfer syntax")
        cx_id = found
        end = f.seek(0, 2)
        length = end - meta.dataset_offset
        f.seek(meta.dataset_offset)
        cmd = encode_store_rq(meta.sop_class_uid, meta.sop_instance_uid, msg_id, priority,
                              originator_aet, originator_id)
        peer_max = int(assoc.dimse.maximum_pdu_size or 0)
        fragment = MAX_FRAGMENT if peer_max == 0 else min(peer_max - 6, MAX_FRAGMENT)
        if fragment < len(cmd):
            raise Unsupported(f"peer maximum PDU length {peer_max} below the command set")
        buffers = (buf for buf, _ in _buffers(f, length, cx_id, fragment, cmd))
    lease = _lease(assoc) if direct else None
    if lease is not None:
        status = _exchange(assoc, lease, buffers, cx_id, msg_id)
        if isinstance(f, Prepared):  # every byte of it is written: its buffer is free
            f.recycle()
        return status
    return _via_dul(assoc, buffers, cx_id)


def _pause_reactor(assoc: Any) -> bool:
    """Keep the association's reactor off the message queue (our response is ours);
    False when we are the reactor."""
    if threading.current_thread() is assoc:
        return False
    assoc._reactor_checkpoint.clear()
    assoc._pacsd_paused = True
    return True


def _wait_paused(assoc: Any) -> None:
    while not assoc._is_paused:
        time.sleep(0.0001)


def _exchange(assoc: Any, lease: SocketLease, buffers: Iterable[Any], cx_id: int,
              msg_id: int) -> Dataset:
    """Send and read the C-STORE-RSP in this thread, holding the socket lease."""
    dul = assoc.dul
    paused = _pause_reactor(assoc)
    if not _alive(assoc):
        raise ConnectionError("association ended before the C-STORE was sent")
    lease.begin(lambda: _alive(assoc))
    taker: _RspTaker = assoc.pacsd_fast
    keep, sent, timed_out, rsp = False, False, False, None
    try:
        raw = dul.socket.socket
        try:
            for buf in buffers:
                raw.sendall(buf)
                sent = True
        except OSError:
            dul.event_queue.put("Evt17")  # transport closed, as AssociationSocket.send
            raise ConnectionError("association ended while sending a C-STORE dataset") \
                from None
        if paused:
            _wait_paused(assoc)
        if not _readable(lease, raw, assoc.dimse_timeout):
            timed_out = True
        else:
            taker.cx_id, taker.msg_id, taker.rsp = cx_id, msg_id, None
            taker.thread = threading.get_ident()
            try:
                rsp, keep = _read_response(dul, raw, taker)
            finally:
                taker.thread = 0
                taker.rsp = None
            dul._idle_timer.restart()
    except BaseException:
        lease.end(keep=False)
        if sent and _alive(assoc):
            # part of the message is out and the rest cannot follow: only an abort
            # leaves the peer in a defined state (PS3.8 7.3.1)
            assoc.abort()
        resume(assoc)
        raise
    lease.end(keep=keep)
    if timed_out:
        assoc._pacsd_paused = False
        assoc._reactor_checkpoint.set()
        assoc._handle_no_response()
        return Dataset()
    if rsp is None:  # the reactor takes it from here (abort, release, unusual response)
        return _response(assoc, paused)
    status: Dataset = assoc._check_received_status(rsp)
    return status


_RSP_READ = 16384


def _read_response(dul: Any, raw: Any, taker: _RspTaker) -> tuple[C_STORE | None, bool]:
    """Read what the peer sent after our C-STORE-RQ, usually one read of one small PDU.

    Returns (our plain C-STORE-RSP, or None; whether nothing else was read). Every
    other PDU is checked and queued for the reactor exactly as its own reader
    (scp/tuning._read_pdu_data) would: decoded PDU and event, Evt19 for an unknown type
    or an undecodable PDU, Evt17 for a closed connection or a PDU over the limits.
    """
    from pacsd.scp import tuning

    def more() -> bytes:
        try:
            return raw.recv(_RSP_READ)  # type: ignore[no-any-return]
        except (OSError, TimeoutError):
            return b""

    data = more()
    rsp: C_STORE | None = None
    while True:
        if not data:
            dul.event_queue.put("Evt17")  # connection closed
            return rsp, False
        while len(data) < 6:
            chunk = more()
            if not chunk:
                dul.event_queue.put("Evt17")
                return rsp, False
            data += chunk
        pdu_type, _, length = _HEAD.unpack_from(data)
        if not 0x01 <= pdu_type <= 0x07:
            dul.event_queue.put("Evt19")  # unknown PDU type
            return rsp, False
        sock = dul.socket
        sock._pacsd_header = bytes(data[:6])
        try:
            tuning._check_pdu_length(sock, length)
        except OSError:
            dul.event_queue.put("Evt17")
            return rsp, False
        sock._pacsd_header = None
        while len(data) < 6 + length:
            chunk = more()
            if not chunk:
                dul.event_queue.put("Evt17")  # short PDU
                return rsp, False
            data += chunk
        pdu, data = data[:6 + length], data[6 + length:]
        if (rsp is None and pdu_type == 0x04 and taker.rsp is None
                and dul.state_machine.current_state == "Sta6"
                and taker.feed(bytearray(pdu[6:]))):
            rsp = taker.rsp
            if not data:
                return rsp, True
            continue
        try:
            decoded, event = dul._decode_pdu(bytearray(pdu))
        except Exception:
            dul.event_queue.put("Evt19")  # undecodable
            return rsp, False
        dul.event_queue.put(event)
        dul._recv_pdu.put(decoded)
        if not data:
            return rsp, False


_HEAD = struct.Struct(">BBL")


def _readable(lease: SocketLease, raw: Any, timeout: float | None) -> bool:
    if isinstance(raw, ssl.SSLSocket) and raw.pending():
        return True
    if lease.poller is None or lease.poller[0] is not raw:
        p = select.poll()
        p.register(raw, select.POLLIN)
        lease.poller = (raw, p)
    return bool(lease.poller[1].poll(
        None if timeout is None else max(0.0, float(timeout)) * 1000))


def _via_dul(assoc: Any, buffers: Iterable[Any], cx_id: int) -> Dataset:
    """Hand the PDUs to the DUL thread (IN_FLIGHT buffers at most) and wait for the
    response on the DIMSE queue."""
    dul = assoc.dul
    frames.install(dul)
    _install_rsp(assoc.dimse)
    paused = _pause_reactor(assoc)
    slots = threading.Semaphore(IN_FLIGHT)
    sent = False
    try:
        pending = None
        for buf in buffers:
            if pending is not None:
                _queue(assoc, dul, frames.Frames(pending, slots.release), cx_id, slots)
                sent = True
            pending = buf
        if pending is not None:
            if paused:
                # the response can only come after the last fragment: make sure the
                # reactor is paused before it can
                _wait_paused(assoc)
            _queue(assoc, dul, frames.Frames(pending, slots.release), cx_id, slots)
            sent = True
    except BaseException:
        if sent and _alive(assoc):
            assoc.abort()
        resume(assoc)
        raise
    return _response(assoc, paused)


def _response(assoc: Any, paused: bool) -> Dataset:
    _, rsp = assoc.dimse.get_msg(block=True)
    if rsp is None:  # DIMSE timeout or the peer went away
        assoc._pacsd_paused = False
        assoc._reactor_checkpoint.set()
        assoc._handle_no_response()
        return Dataset()
    if paused:
        resume(assoc)
    status: Dataset = assoc._check_received_status(rsp)
    return status


def _queue(assoc: Any, dul: Any, framed: frames.Frames, cx_id: int,
           slots: threading.Semaphore) -> None:
    while not slots.acquire(timeout=0.5):
        if not _alive(assoc):
            raise ConnectionError("association ended while sending a C-STORE dataset")
    if not _alive(assoc):
        slots.release()
        raise ConnectionError("association ended while sending a C-STORE dataset")
    dul.send_pdu(frames.pdata(cx_id, framed))


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


__all__ = ["PREPARE_MAX", "FileMeta", "Framer", "Prepared", "SocketLease", "Unsupported",
           "decode_store_rsp", "encode_retrieve_pending", "encode_store_rq", "frame",
           "parse_meta", "read_meta", "resume", "send_c_store"]
