"""Pending C-FIND responses sent as pre-built P-DATA-TF PDUs, many per socket write.

pynetdicom sends a C-FIND handler's matches one by one: per match it encodes the
Identifier with pydicom, builds a C-FIND-RSP primitive, and its DUL thread turns the
command and the data set into two P-DATA-TF PDUs, each a socket write (a TLS record).
Here the handler (`qr.handle_find`) takes identifiers already encoded by
`store.query.find_encoded` and frames each match as one P-DATA-TF PDU (a command PDV and
a data set PDV, or fragments when the peer's maximum PDU length is smaller); the PDUs of
several matches go to the DUL as one primitive and leave in one write. The bytes of each
PDU are what pynetdicom would send, except that the command and data set share a PDU,
which PS3.8 9.3.5 allows (pynetdicom and DCMTK read it). The final status still goes
through pynetdicom, after these (the DUL's queue keeps the order).

All socket I/O stays in the association's DUL thread: the PDUs pass through `send_pdu`
as `scp/frames.Frames` and the DUL writes them as they are.
"""

from __future__ import annotations

import struct
import time
from typing import Any

from pynetdicom.pdu_primitives import P_DATA

from pacsd.scp import frames, status

FLUSH_BYTES = 64 * 1024  # send what is buffered once it reaches this many bytes
FLUSH_SECONDS = 0.05  # ... or once the oldest buffered match has waited this long
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _cmd_element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, elem, len(value)) + value


def encode_find_rsp(sop_class: str, message_id: int, code: int, identifier: bool) -> bytes:
    """A C-FIND-RSP command set without ErrorComment/OffendingElement, Implicit VR Little
    Endian (PS3.7 9.3.2.2), as pynetdicom encodes it."""
    uid = sop_class.encode("ascii")
    body = b"".join([
        _cmd_element(0x0002, uid + b"\0" if len(uid) % 2 else uid),
        _cmd_element(0x0100, struct.pack("<H", 0x8020)),
        _cmd_element(0x0120, struct.pack("<H", message_id)),
        _cmd_element(0x0800, struct.pack("<H", 0x0001 if identifier else 0x0101)),
        _cmd_element(0x0900, struct.pack("<H", code)),
    ])
    return _cmd_element(0x0000, struct.pack("<I", len(body))) + body


def encode_find_pending(sop_class: str, message_id: int) -> bytes:
    """The C-FIND-RSP command set with Status Pending and an Identifier following."""
    return encode_find_rsp(sop_class, message_id, status.PENDING, True)


def plain_final(rsp: Any) -> bool:
    """A final C-FIND-RSP of Success with nothing but the command's required elements
    (anything else, such as a failure with a comment, takes pynetdicom's encoder)."""
    return (rsp.Status == status.SUCCESS and rsp.Identifier is None
            and rsp.ErrorComment is None and rsp.OffendingElement is None
            and rsp.MessageIDBeingRespondedTo is not None
            and rsp.AffectedSOPClassUID is not None)


def final_pdata(rsp: Any, context_id: int) -> P_DATA:
    """The P-DATA of a `plain_final` response: one PDV, the whole command set."""
    cmd = encode_find_rsp(str(rsp.AffectedSOPClassUID), int(rsp.MessageIDBeingRespondedTo),
                          status.SUCCESS, False)
    pdata = P_DATA()
    pdata.presentation_data_value_list = [[context_id, b"\x03" + cmd]]  # type: ignore[list-item]
    return pdata


def _pdu(pdvs: list[tuple[int, bytes]], context_id: int) -> bytes:
    """One P-DATA-TF PDU holding the given (message control header, data) PDVs."""
    items = b"".join(struct.pack(">IBB", len(data) + 2, context_id, control) + data
                     for control, data in pdvs)
    return struct.pack(">BBI", 0x04, 0x00, len(items)) + items


def frame_pending(command: bytes, identifier: bytes, context_id: int, max_pdu: int) -> bytes:
    """A pending C-FIND-RSP as P-DATA-TF PDUs: command and identifier in one PDU when it
    fits the peer's maximum PDU length (0 = no limit), else each in fragments of at most
    max_pdu - 6 bytes, one PDV per PDU, as pynetdicom fragments (PS3.8 9.3.5, E.2)."""
    if not max_pdu or len(command) + len(identifier) + 12 <= max_pdu:
        return _pdu([(0x03, command), (0x02, identifier)], context_id)
    room = max(max_pdu - 6, 1)
    out = []
    for last_flag, data in ((0x03, command), (0x02, identifier)):
        for offset in range(0, max(len(data), 1), room):
            last = offset + room >= len(data)
            out.append(_pdu([(last_flag if last else last_flag & 1, data[offset:offset + room])],
                            context_id))
    return b"".join(out)


class PendingSender:
    """Buffers a request's pending responses and hands them to the DUL in batches."""

    def __init__(self, assoc: Any, context_id: int, sop_class: str, message_id: int) -> None:
        self._dul = assoc.dimse.dul
        frames.install(self._dul)
        self._context_id = context_id
        self._max_pdu = int(assoc.dimse.maximum_pdu_size or 0)
        self._command = encode_find_pending(sop_class, message_id)
        # what every match's PDU repeats: the command PDV, and the data PDV's ID + header
        self._command_pdv = struct.pack(">IBB", len(self._command) + 2, context_id, 0x03) \
            + self._command
        self._data_id = bytes([context_id, 0x02])
        self._buffer: list[bytes] = []
        self._size = 0
        self._since = 0.0

    @staticmethod
    def implicit_vr(transfer_syntax: str) -> bool | None:
        """True/False for the syntaxes this sender serves, None for any other."""
        return {IMPLICIT_LE: True, EXPLICIT_LE: False}.get(str(transfer_syntax))

    def add(self, identifier: bytes) -> None:
        """Queue one match (frame_pending's bytes; its one-PDU case inlined here)."""
        if not self._buffer:
            self._since = time.monotonic()
        n = len(identifier)
        length = len(self._command_pdv) + 6 + n
        if self._max_pdu and length > self._max_pdu:
            framed = frame_pending(self._command, identifier, self._context_id, self._max_pdu)
            self._buffer.append(framed)
        else:
            self._buffer += (_PDU_HEAD(0x04, 0x00, length), self._command_pdv,
                             _LENGTH(n + 2), self._data_id, identifier)
        self._size += length + 6
        if self._size >= FLUSH_BYTES or time.monotonic() - self._since >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        self._dul.send_pdu(frames.pdata(self._context_id,
                                        frames.Frames(b"".join(self._buffer))))
        self._buffer.clear()
        self._size = 0


_PDU_HEAD = struct.Struct(">BBI").pack
_LENGTH = struct.Struct(">I").pack
