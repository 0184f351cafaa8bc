"""Part 10 preamble and File Meta Information (group 0002) encoded without pydicom.

On the C-STORE hot path pydicom's `write_file_meta_info(create_file_meta(...))` costs a
dataset build and an encoder run per instance; the group is seven fixed elements, so
we pack the bytes directly. The result parses to the same elements as pydicom's (a unit
test checks it), with our Implementation Class UID and Version Name.
"""

from __future__ import annotations

import struct
from functools import lru_cache

# A 2.25 (UUID-derived) UID: no registered root needed (PS3.5 B.2).
IMPLEMENTATION_CLASS_UID = "2.25.27277292532779016753034271415300064566"
IMPLEMENTATION_VERSION_NAME = "PACSD_0.1"

PREAMBLE = b"\x00" * 128 + b"DICM"

_SHORT = struct.Struct("<HH2sH")  # tag group, tag element, VR, 16-bit length
_LONG = struct.Struct("<HH2s2xI")  # tag group, tag element, VR, reserved, 32-bit length


def _ui(element: int, uid: str) -> bytes:
    value = uid.encode("ascii")
    if len(value) % 2:
        value += b"\x00"  # UI pads with NUL to even length (PS3.5 6.2)
    if len(value) > 0xFFFF:
        raise ValueError("UID too long to encode")
    return _SHORT.pack(0x0002, element, b"UI", len(value)) + value


def _sh(element: int, text: str) -> bytes:
    value = text.encode("ascii")
    if len(value) % 2:
        value += b" "  # SH pads with a space
    return _SHORT.pack(0x0002, element, b"SH", len(value)) + value


@lru_cache(maxsize=1)
def _fixed_tail() -> bytes:
    return _ui(0x0012, IMPLEMENTATION_CLASS_UID) + _sh(0x0013, IMPLEMENTATION_VERSION_NAME)


_VERSION = _LONG.pack(0x0002, 0x0001, b"OB", 2) + b"\x00\x01"


def group2_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """The encoded group 0002 (Explicit VR Little Endian), group length first.

    Raises ValueError when a UID is not ASCII.
    """
    body = b"".join((
        _VERSION,
        _ui(0x0002, sop_class_uid),
        _ui(0x0003, sop_instance_uid),
        _ui(0x0010, transfer_syntax_uid),
        _fixed_tail(),
    ))
    return _SHORT.pack(0x0002, 0x0000, b"UL", 4) + struct.pack("<I", len(body)) + body


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble + "DICM" + group 0002: everything in a Part 10 file before the dataset.

    Raises ValueError when a UID is not ASCII.
    """
    return PREAMBLE + group2_bytes(sop_class_uid, sop_instance_uid, transfer_syntax_uid)


# pynetdicom's chunked C-STORE receipt (dimse_messages.py) does
#     write_file_meta_info(fp, create_file_meta(sop_class_uid=..., sop_instance_uid=...,
#                                               transfer_syntax=...))
# after writing the preamble itself; ~0.9 ms per instance through pydicom. app.py may
# bind these two in dimse_messages' namespace instead (2 µs, same bytes, our
# Implementation Class UID):
MetaUIDs = tuple[str, str, str]


def create_meta_uids(*, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
                     **_ignored: object) -> MetaUIDs:
    """Stand-in for pynetdicom's create_file_meta: just the three UIDs."""
    return (str(sop_class_uid), str(sop_instance_uid), str(transfer_syntax))


def write_meta_uids(fp: object, meta: MetaUIDs, *_args: object, **_kwargs: object) -> None:
    """Stand-in for pydicom's write_file_meta_info taking create_meta_uids' result.

    Raises ValueError when a UID is not ASCII.
    """
    fp.write(group2_bytes(*meta))  # type: ignore[attr-defined]
