"""C-STORE from the socket to the store in the receiving thread (issue 2's ingest rate).

pynetdicom turns every P-DATA-TF PDU into PDU and primitive objects, runs it through
its state machine and DIMSE message assembly, decodes the command set with pydicom,
queues the message to the association thread, dispatches it through a service class
and an event, and sends the response back through two more queues: about half of the
worker CPU of a small C-STORE, and two thread hand-offs per instance.

Here the DUL thread, having read a P-DATA-TF PDU, offers it to `FastStore.feed`
first. A message qualifies when its whole command set arrives in the PDU's first
PDV, is a C-STORE-RQ with a dataset for a storage SOP class on an accepted context
where we are the SCP, and its UIDs encode: the dataset fragments then go straight
into the same hashing spool file pynetdicom's chunked receipt would have written
(same Part 10 bytes), `handlers.store_spool` runs gate 5 and the ingest, and the
C-STORE-RSP is written to the socket by the thread that owns it. Everything else
(C-ECHO, C-FIND, a command set split over PDUs, ...) is left to pynetdicom, and
`FastStore` only follows it to know where the next message starts. A PDV sequence no
valid peer sends inside a message this path holds makes the association abort
(Evt19, as pynetdicom does for an invalid PDU), audited.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from pacsd.scp import handlers, limits, tuning
from pacsd.scp.state import AssocState, Services
from pacsd.store.filemeta import file_meta_bytes

log = logging.getLogger("pacsd.faststore")

_ITEM = struct.Struct(">LBB")  # PDV item length, presentation context ID, control header
_ELEMENT = struct.Struct("<HHL")  # implicit VR LE: group, element, value length
_US = struct.Struct("<H")
_RSP = struct.Struct(">BBLLBB")  # P-DATA-TF header + one PDV item header

C_STORE_RQ = 0x0001
NO_DATASET = 0x0101
_US_ELEMENTS = {0x0100: "command", 0x0110: "message_id", 0x0700: "priority",
                0x0800: "dataset_type", 0x1031: "move_message_id"}
_UI_ELEMENTS = {0x0002: "sop_class", 0x1000: "sop_instance"}
_OTHER_ELEMENTS = {0x0000, 0x1030}  # group length, move originator AE


def decode_command(data: Any) -> dict[str, Any] | None:
    """The fields of a DIMSE command set (Implicit VR Little Endian, group 0000) this
    path needs, or None when it is anything but a well-formed set of known elements
    (then pynetdicom's decoder has the say)."""
    mv = memoryview(data)
    n = len(mv)
    if not n:
        return None
    off = 0
    out: dict[str, Any] = {}
    while off < n:
        if n - off < 8:
            return None
        group, element, length = _ELEMENT.unpack_from(mv, off)
        off += 8
        if group != 0x0000 or length > n - off:
            return None
        value = mv[off:off + length]
        off += length
        if element in _US_ELEMENTS:
            if length != 2:
                return None
            out[_US_ELEMENTS[element]] = _US.unpack(value)[0]
        elif element in _UI_ELEMENTS:
            try:
                uid = bytes(value).decode("ascii").rstrip("\0 ")
            except UnicodeDecodeError:
                return None
            out[_UI_ELEMENTS[element]] = uid
        elif element not in _OTHER_ELEMENTS:
            return None
    return out


def encode_pdata(context_id: int, command: bytes) -> bytes:
    """A P-DATA-TF PDU carrying one whole command set (one PDV, last command fragment)."""
    return _RSP.pack(0x04, 0x00, len(command) + 6, len(command) + 2, context_id,
                     0x03) + command


class _Follower:
    """Tracks a message pynetdicom handles, to know when the next one starts."""

    def __init__(self, limit: int) -> None:
        self._command = bytearray()
        self._limit = limit
        self._awaiting_dataset = False

    def item(self, control: int, data: Any) -> bool:
        """One PDV of the message; True when it was the message's last."""
        if control & 1:
            if len(self._command) < self._limit:
                self._command += data
            if not control & 2:
                return False
            cmd = decode_command(self._command)
            self._command = bytearray()
            kind = None if cmd is None else cmd.get("dataset_type")
            # no dataset, or a command pynetdicom will refuse: the message ends here
            self._awaiting_dataset = kind is not None and kind != NO_DATASET
            return not self._awaiting_dataset
        return bool(control & 2)


class FastStore:
    """Per association; fed only from its DUL thread, so it needs no lock."""

    def __init__(self, assoc: Any, services: Services, state: AssocState) -> None:
        self.assoc = assoc
        self.services = services
        self.state = state
        self.stored = 0  # C-STOREs answered on this path (tests read it)
        self._spool: Any = None
        self._cmd: dict[str, Any] = {}
        self._context = 0
        self._transfer_syntax = ""
        self._follow: _Follower | None = None
        self._limit = int(getattr(assoc.ae, "pacsd_max_request", 0) or 1 << 22)

    # -- the DUL thread's entry point -----------------------------------------------
    def feed(self, body: Any) -> bool:
        """Offer one P-DATA-TF PDU's body (after the 6-byte header). True: it was
        taken here (stored, or the association is being aborted); False: pynetdicom
        must process the PDU as usual."""
        mv = memoryview(body)
        items = _items(mv)
        if items is None:
            if self._spool is None:
                self._follow = None  # pynetdicom will refuse the PDU and abort
                return False
            return self._violation("malformed PDV items in a C-STORE dataset")
        if self._spool is not None:
            return self._dataset(mv, items)
        if self._follow is not None:
            self._track(mv, items)
            return False
        context_id, control, start, end = items[0]
        if control & 3 == 3 and self._begin(context_id, mv[start:end]):
            return self._dataset(mv, items[1:])
        self._follow = _Follower(self._limit)
        self._track(mv, items)
        return False

    def close(self) -> None:
        """Drop an unfinished dataset (the association ended mid-transfer)."""
        spool, self._spool = self._spool, None
        if spool is not None:
            spool.abort()

    # -- inside ------------------------------------------------------------------------
    def _track(self, mv: memoryview, items: list[tuple[int, int, int, int]]) -> None:
        assert self._follow is not None
        for _, control, start, end in items:
            if self._follow.item(control, mv[start:end]):
                self._follow = None  # pynetdicom ignores PDVs after a message's last
                return

    def _begin(self, context_id: int, command: memoryview) -> bool:
        """Open a spool for a qualifying C-STORE-RQ; False leaves it to pynetdicom."""
        cmd = decode_command(command)
        if (cmd is None or cmd.get("command") != C_STORE_RQ
                or cmd.get("dataset_type", NO_DATASET) == NO_DATASET
                or "message_id" not in cmd or "priority" not in cmd
                or not cmd.get("sop_class") or not cmd.get("sop_instance")):
            return False
        assoc = self.assoc
        cx = assoc._accepted_cx.get(context_id)
        sop_class = cmd["sop_class"]
        if cx is None or not cx.as_scp or not cx.transfer_syntax:
            return False
        if sop_class in getattr(assoc.acceptor, "accepted_common_extended", {}):
            return False
        try:
            if uid_to_service_class(sop_class) is not StorageServiceClass:
                return False
            meta = file_meta_bytes(sop_class, cmd["sop_instance"], str(cx.transfer_syntax[0]))
        except (ValueError, TypeError):
            return False
        try:
            spool = self.services.store.spool()
        except OSError:
            return False  # pynetdicom's receipt meets the same error and aborts, audited
        try:
            spool.write(meta)
        except BaseException:
            spool.abort()
            raise
        self._spool = spool
        self._cmd = cmd
        self._context = context_id
        self._transfer_syntax = str(cx.transfer_syntax[0])
        return True

    def _dataset(self, mv: memoryview, items: list[tuple[int, int, int, int]]) -> bool:
        spool = self._spool
        for i, (context_id, control, start, end) in enumerate(items):
            if control & 1 or context_id != self._context:
                return self._violation("a command or another context's PDV inside a "
                                       "C-STORE dataset")
            spool.write(mv[start:end])
            if control & 2:
                if i != len(items) - 1:
                    return self._violation("PDVs after the last fragment of a C-STORE "
                                           "dataset")
                self._complete()
        return True

    def _complete(self) -> None:
        spool, self._spool = self._spool, None
        cmd = self._cmd
        try:
            code, comment = handlers.store_spool(
                self.services, self.state, spool, sop_class_uid=cmd["sop_class"],
                sop_instance_uid=cmd["sop_instance"], transfer_syntax=self._transfer_syntax)
        except Exception:  # as pynetdicom answers a handler that raised
            log.exception("C-STORE handling failed")
            spool.abort()
            code, comment = 0xC211, "internal error"
        rsp = tuning.encode_store_rsp(cmd["sop_class"], cmd["message_id"], code,
                                      cmd["sop_instance"], comment)
        self.stored += 1
        self.assoc.dul.socket.send(encode_pdata(self._context, rsp))

    def _violation(self, reason: str) -> bool:
        self.close()
        log.warning("aborting association: %s", reason)
        limits.refused(self.assoc, "dimse", reason)
        self.assoc.dul.event_queue.put("Evt19")
        return True


def _items(mv: memoryview) -> list[tuple[int, int, int, int]] | None:
    """(context ID, control header, start, end) of each PDV's data; None if malformed."""
    out = []
    off, n = 0, len(mv)
    while off < n:
        if n - off < 6:
            return None
        length, context_id, control = _ITEM.unpack_from(mv, off)
        if length < 2 or length > n - off - 4:
            return None
        out.append((context_id, control, off + 6, off + 4 + length))
        off += 4 + length
    return out or None


def attach(assoc: Any, services: Services, state: AssocState) -> None:
    """Give an accepted association its fast path (read by tuning's PDU reader)."""
    assoc.pacsd_fast = FastStore(assoc, services, state)


__all__ = ["FastStore", "attach", "decode_command", "encode_pdata"]
