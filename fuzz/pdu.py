"""Hand-written DICOM upper-layer encoders (PS3.8 9.3) for hostile-peer tests and fuzzing.

Independent of pynetdicom's encoder on purpose: a fuzzer must be able to build what a
correct encoder never would (wrong lengths, repeated items, absurd sizes).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

APP_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
IMPL_UID = "1.2.826.0.1.3680043.9.7433.1"


def _uid(uid: str | bytes) -> bytes:
    return uid.encode("ascii") if isinstance(uid, str) else uid


def item(item_type: int, body: bytes, *, length: int | None = None) -> bytes:
    """A variable item: type, reserved, 2-byte length (overridable to lie), body."""
    n = len(body) if length is None else length
    return struct.pack(">BBH", item_type, 0, n & 0xFFFF) + body


def pdu(pdu_type: int, body: bytes, *, length: int | None = None) -> bytes:
    """A PDU: type, reserved, 4-byte length (overridable to lie), body."""
    return struct.pack(">BBL", pdu_type, 0, len(body) if length is None else length) + body


def pres_context(ctx_id: int, abstract: str | bytes, transfer: Sequence[str | bytes]) -> bytes:
    body = struct.pack(">BBBB", ctx_id, 0, 0, 0) + item(0x30, _uid(abstract))
    body += b"".join(item(0x40, _uid(t)) for t in transfer)
    return item(0x20, body)


def user_identity(user_type: int, primary: bytes, secondary: bytes = b"",
                  positive_response: int = 0) -> bytes:
    body = struct.pack(">BBH", user_type, positive_response, len(primary)) + primary
    body += struct.pack(">H", len(secondary)) + secondary
    return item(0x58, body)


def user_info(max_pdu: int = 16384, *, impl_uid: str = IMPL_UID,
              extra: bytes = b"") -> bytes:
    body = item(0x51, struct.pack(">L", max_pdu)) + item(0x52, _uid(impl_uid)) + extra
    return item(0x50, body)


def associate_rq(calling: str, called: str,
                 contexts: Iterable[tuple[int, str | bytes, Sequence[str | bytes]]] = (
                     (1, VERIFICATION, (IMPLICIT_LE,)),),
                 *, max_pdu: int = 16384, extra_user: bytes = b"",
                 app_context: str = APP_CONTEXT, raw_items: bytes | None = None) -> bytes:
    """A-ASSOCIATE-RQ; `raw_items` replaces everything after the fixed header."""
    head = struct.pack(">HH", 1, 0) + called.encode().ljust(16)[:16]
    head += calling.encode().ljust(16)[:16] + b"\0" * 32
    if raw_items is None:
        raw_items = item(0x10, _uid(app_context))
        raw_items += b"".join(pres_context(i, a, t) for i, a, t in contexts)
        raw_items += user_info(max_pdu, extra=extra_user)
    return pdu(0x01, head + raw_items)


def pdv(ctx_id: int, control: int, payload: bytes) -> bytes:
    """One presentation data value item (length, context id, control header, payload)."""
    return struct.pack(">LBB", len(payload) + 2, ctx_id, control) + payload


def p_data(*pdvs: bytes) -> bytes:
    return pdu(0x04, b"".join(pdvs))


def release_rq() -> bytes:
    return pdu(0x05, b"\0" * 4)


def abort() -> bytes:
    return pdu(0x07, b"\0\0\0\0")


# ------------------------------------------------------------------ DIMSE command sets

def _elem(tag_elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, tag_elem, len(value)) + value


def _ui(uid: str) -> bytes:
    b = uid.encode("ascii")
    return b + b"\0" if len(b) % 2 else b


def command(field: int, message_id: int, *, sop_class: str, sop_instance: str | None = None,
            has_dataset: bool = False, priority: int | None = 0,
            extra: Sequence[tuple[int, bytes]] = ()) -> bytes:
    """A DIMSE request command set, Implicit VR Little Endian, with group length."""
    els = [(0x0002, _ui(sop_class)), (0x0100, struct.pack("<H", field)),
           (0x0110, struct.pack("<H", message_id))]
    if priority is not None:
        els.append((0x0700, struct.pack("<H", priority)))
    els.append((0x0800, struct.pack("<H", 0x0000 if has_dataset else 0x0101)))
    if sop_instance is not None:
        els.append((0x1000, _ui(sop_instance)))
    els.extend(extra)
    els.sort()
    body = b"".join(_elem(t, v) for t, v in els)
    return _elem(0x0000, struct.pack("<I", len(body))) + body


def c_echo_rq(message_id: int = 1) -> bytes:
    return command(0x0030, message_id, sop_class=VERIFICATION, priority=None)


def c_store_rq(message_id: int, sop_instance: str, sop_class: str = CT_IMAGE) -> bytes:
    return command(0x0001, message_id, sop_class=sop_class, sop_instance=sop_instance,
                   has_dataset=True)


def c_find_rq(message_id: int = 1, sop_class: str = STUDY_ROOT_FIND) -> bytes:
    return command(0x0020, message_id, sop_class=sop_class, has_dataset=True)


def read_pdu(sock, timeout: float = 10.0) -> tuple[int, bytes] | None:  # type: ignore[no-untyped-def]
    """Read one PDU from a socket: (type, body), or None when the peer closed."""
    sock.settimeout(timeout)
    head = _read_exact(sock, 6)
    if len(head) < 6:
        return None
    t, _, n = struct.unpack(">BBL", head)
    body = _read_exact(sock, n)
    return t, body


def _read_exact(sock, n: int) -> bytes:  # type: ignore[no-untyped-def]
    out = bytearray()
    while len(out) < n:
        try:
            chunk = sock.recv(n - len(out))
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    return bytes(out)
