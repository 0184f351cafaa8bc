"""The indexed attributes of a Part 10 file, read straight from its first bytes.

pydicom's `read_partial` builds a Dataset of raw elements to give the store about
twenty values; on a small C-STORE that was a fifth of the worker's CPU. This walks the
elements itself, for the common case only: a preamble, an Explicit VR Little Endian
file meta group, a dataset in Implicit or Explicit VR Little Endian (every transfer
syntax but Big Endian and Deflated), well-formed up to group 0x0020, and every value it
keeps plain ASCII without escape sequences. For anything else it returns None and the
caller parses with pydicom as before, so what is accepted and how values are decoded
do not change (tests/unit/test_store_scan.py compares the two).
"""

from __future__ import annotations

import struct
from functools import lru_cache

LAST_INDEXED_TAG = 0x0020FFFF  # every attribute the index keeps is in groups <= 0x0020
_MAX_DEPTH = 16  # nested sequences of undefined length we follow before giving up

_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<L")
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD

IMPLICIT_LE = "1.2.840.10008.1.2"
_NOT_EXPLICIT_LE = frozenset({"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"})

# tag -> the name the store uses for it
WANTED: dict[int, str] = {
    0x00080005: "SpecificCharacterSet",
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x00080020: "StudyDate",
    0x00080030: "StudyTime",
    0x00080050: "AccessionNumber",
    0x00080060: "Modality",
    0x00080090: "ReferringPhysicianName",
    0x00081030: "StudyDescription",
    0x0008103E: "SeriesDescription",
    0x00100010: "PatientName",
    0x00100020: "PatientID",
    0x00100021: "IssuerOfPatientID",
    0x00100030: "PatientBirthDate",
    0x00100040: "PatientSex",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
    0x00200010: "StudyID",
    0x00200011: "SeriesNumber",
    0x00200013: "InstanceNumber",
}


@lru_cache(maxsize=64)
def _explicit(ts: str) -> bool | None:
    """True: Explicit VR LE dataset; False: Implicit VR LE; None: not for this path."""
    if ts == IMPLICIT_LE:
        return False
    if ts in _NOT_EXPLICIT_LE or not ts.startswith("1.2.840.10008.1.2."):
        return None
    return True


def scan(head: bytes, complete: bool) -> dict[str, bytes] | None:
    """{keyword: raw value} of the WANTED elements present, or None (use pydicom).

    `head`: the first bytes of a Part 10 file; `complete`: it is the whole file.
    """
    mv = memoryview(head)
    n = len(mv)
    if n < 132 or head[128:132] != b"DICM":
        return None
    off, ts = 132, None
    while off + 8 <= n:  # group 0002, always Explicit VR Little Endian
        group, element = _TAG.unpack_from(mv, off)
        if group != 0x0002:
            break
        got = _element(mv, off, True)
        if got is None:
            return None
        start, length = got
        if element == 0x0010:
            try:
                ts = bytes(mv[start:start + length]).rstrip(b"\x00 ").decode("ascii")
            except UnicodeDecodeError:
                return None
        off = start + length
    explicit = _explicit(ts) if ts else None
    if explicit is None:
        return None
    out: dict[str, bytes] = {}
    while True:
        if off == n:
            return out if complete else None
        if n - off < 8:
            return None
        group, element = _TAG.unpack_from(mv, off)
        tag = group << 16 | element
        if tag > LAST_INDEXED_TAG or group == 0x0002:
            return out if tag > LAST_INDEXED_TAG else None
        got = _element(mv, off, explicit)
        if got is None:
            return None
        start, length = got
        if length == _UNDEFINED:
            end = _skip_undefined(mv, off, start, explicit, 0)
            if end is None:
                return None
            off = end
            continue
        keyword = WANTED.get(tag)
        if keyword is not None:
            raw = bytes(mv[start:start + length])
            if not raw.isascii() or b"\x1b" in raw:
                return None  # a decoded character set: pydicom's job
            out[keyword] = raw
        off = start + length


def _element(mv: memoryview, off: int, explicit: bool) -> tuple[int, int] | None:
    """(value offset, value length) of the element at `off`; None when it does not fit.
    An undefined length is returned as is (the value is not checked to fit)."""
    n = len(mv)
    if explicit:
        vr = bytes(mv[off + 4:off + 6])
        if vr in _LONG_VRS:
            if n - off < 12:
                return None
            start, length = off + 12, _U32.unpack_from(mv, off + 8)[0]
        elif vr.isalpha() and vr.isupper():
            start, length = off + 8, _U16.unpack_from(mv, off + 6)[0]
        else:
            return None
    else:
        start, length = off + 8, _U32.unpack_from(mv, off + 4)[0]
    if length != _UNDEFINED and length > n - start:
        return None
    if length == _UNDEFINED and explicit and vr not in (b"SQ", b"UN"):
        return None
    return start, length


def _skip_undefined(mv: memoryview, off: int, start: int, explicit: bool,
                    depth: int) -> int | None:
    """Offset after the element at `off` whose value (at `start`) has undefined length: a
    sequence, or UN, whose content is Implicit VR Little Endian (PS3.5 6.2.2)."""
    un = explicit and bytes(mv[off + 4:off + 6]) == b"UN"
    return _skip_sequence(mv, start, explicit and not un, depth)


def _skip_sequence(mv: memoryview, off: int, explicit: bool, depth: int) -> int | None:
    """Offset after a sequence of undefined length whose items start at `off`."""
    if depth > _MAX_DEPTH:
        return None
    n = len(mv)
    while n - off >= 8:
        group, element = _TAG.unpack_from(mv, off)
        tag = group << 16 | element
        length = _U32.unpack_from(mv, off + 4)[0]
        off += 8
        if tag == _SEQUENCE_END:
            return off
        if tag != _ITEM:
            return None
        if length == _UNDEFINED:
            end = _skip_item(mv, off, explicit, depth + 1)
            if end is None:
                return None
            off = end
        elif length > n - off:
            return None
        else:
            off += length
    return None


def _skip_item(mv: memoryview, off: int, explicit: bool, depth: int) -> int | None:
    """Offset after an item of undefined length whose elements start at `off`."""
    n = len(mv)
    while n - off >= 8:
        group, element = _TAG.unpack_from(mv, off)
        if (group << 16 | element) == _ITEM_END:
            return off + 8
        got = _element(mv, off, explicit)
        if got is None:
            return None
        start, length = got
        if length == _UNDEFINED:
            end = _skip_undefined(mv, off, start, explicit, depth + 1)
            if end is None:
                return None
            off = end
        else:
            off = start + length
    return None


__all__ = ["LAST_INDEXED_TAG", "WANTED", "scan"]
