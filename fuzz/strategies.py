"""Hypothesis strategies: valid seed messages and mutations of them, plus structured
generators for what a careless or hostile peer sends (lying lengths, repeated items,
absurd identities, wrong VRs, deep sequences, odd character sets)."""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import strategies as st

from fuzz import pdu

# ------------------------------------------------------------------ mutations of seeds


@st.composite
def mutated(draw: Any, seed: bytes, max_ops: int = 6) -> bytes:
    """`seed` with a few byte-level mutations: flips, overwrites of length-like fields,
    inserts, deletes, truncation, duplication of a slice."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(0, max_ops))):
        if not data:
            break
        op = draw(st.sampled_from(["flip", "byte", "len16", "len32", "insert", "delete",
                                   "truncate", "dup"]))
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            data[i] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x01, 0x20, 0x5C]))
        elif op == "len16" and i + 2 <= len(data):
            v = draw(st.sampled_from([0, 1, 0x7FFF, 0xFFFF, len(data)]))
            data[i:i + 2] = struct.pack(">H", v & 0xFFFF)
        elif op == "len32" and i + 4 <= len(data):
            v = draw(st.sampled_from([0, 1, 0xFFFFFFFF, 0x7FFFFFFF, len(data), 0xFFFF]))
            data[i:i + 4] = struct.pack(draw(st.sampled_from([">L", "<L"])), v)
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=32))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[i:]
        elif op == "dup":
            j = min(len(data), i + draw(st.integers(1, 64)))
            data[j:j] = data[i:j] * draw(st.integers(1, 8))
    return bytes(data)


def fix_pdu_length(data: bytes) -> bytes:
    """Make the 4-byte PDU length agree with the body, as a reader would need."""
    if len(data) < 6:
        return data
    return data[:2] + struct.pack(">L", len(data) - 6) + data[6:]


# ------------------------------------------------------------------ A-ASSOCIATE-RQ

UIDS = [pdu.VERIFICATION, pdu.CT_IMAGE, pdu.STUDY_ROOT_FIND, pdu.IMPLICIT_LE,
        pdu.EXPLICIT_LE]
ae_text = st.one_of(st.sampled_from(["PACSD", "MOD", "", " ", "PACSD\\X", "A" * 16]),
                    st.text(max_size=20))
uid_bytes = st.one_of(st.sampled_from([u.encode() for u in UIDS]),
                      st.binary(max_size=80),
                      st.integers(0, 300).map(lambda n: b"1." * n))


@st.composite
def identity_items(draw: Any) -> bytes:
    """User identity sub-items (PS3.7 D.3.3.7), valid or not: any type, lying lengths,
    huge or empty fields, several of them."""
    items = b""
    for _ in range(draw(st.integers(0, 3))):
        utype = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 255]))
        primary = draw(st.one_of(st.binary(max_size=300), st.just(b"admin"),
                                 st.just("ü".encode() * 40), st.just(b"\0" * 65535)))
        secondary = draw(st.one_of(st.binary(max_size=300), st.just(b"x" * 65535)))
        body = struct.pack(">BBH", utype, draw(st.integers(0, 1)), len(primary)) + primary
        body += struct.pack(">H", len(secondary) & 0xFFFF) + secondary
        lie = draw(st.one_of(st.none(), st.integers(0, 0xFFFF)))
        items += pdu.item(0x58, body[:0xFFFF], length=lie)
    return items


@st.composite
def associate_rqs(draw: Any) -> bytes:
    """Structured A-ASSOCIATE-RQ variants, PDU length always consistent."""
    contexts = [(draw(st.integers(0, 255)), draw(uid_bytes),
                 draw(st.lists(uid_bytes, max_size=4)))
                for _ in range(draw(st.integers(0, 12)))]
    extra = draw(identity_items())
    if draw(st.booleans()):
        extra += draw(st.binary(max_size=64))
    raw = None
    if draw(st.integers(0, 4)) == 0:  # repeated / unknown top-level items
        raw = b"".join(pdu.item(draw(st.sampled_from([0x10, 0x20, 0x50, 0x51, 0x99])),
                                draw(st.binary(max_size=40)))
                       for _ in range(draw(st.integers(0, 8))))
    return pdu.associate_rq(draw(ae_text)[:16] or " ", draw(ae_text)[:16] or " ", contexts,
                            max_pdu=draw(st.sampled_from([0, 1, 16384, 0xFFFFFFFF])),
                            extra_user=extra, raw_items=raw)


def seed_associate_rq() -> bytes:
    return pdu.associate_rq("MOD", "PACSD", [(1, pdu.VERIFICATION, [pdu.IMPLICIT_LE]),
                                              (3, pdu.CT_IMAGE, [pdu.EXPLICIT_LE])],
                            extra_user=pdu.user_identity(2, b"alice", b"secret"))


any_associate_rq = st.one_of(
    associate_rqs(),
    mutated(seed_associate_rq()).map(fix_pdu_length),
)

# ------------------------------------------------------------------ DIMSE command sets

SEED_COMMANDS = [pdu.c_echo_rq(1), pdu.c_store_rq(7, "1.2.3.4"), pdu.c_find_rq(2),
                 pdu.command(0x0021, 3, sop_class="1.2.840.10008.5.1.4.1.2.2.2",
                             has_dataset=True,
                             extra=[(0x0600, b"DEST" + b" " * 12)]),
                 pdu.command(0x0FFF, 4, sop_class="1.2.840.10008.1.1")]


@st.composite
def command_sets(draw: Any) -> bytes:
    if draw(st.booleans()):
        return bytes(draw(mutated(draw(st.sampled_from(SEED_COMMANDS)))))
    # random elements of group 0000 with random values
    els = []
    for _ in range(draw(st.integers(0, 10))):
        tag = draw(st.sampled_from([0x0000, 0x0002, 0x0100, 0x0110, 0x0120, 0x0700, 0x0800,
                                    0x0900, 0x1000, 0x1030, 0x0600, 0x0901, 0x1020]))
        els.append(struct.pack("<HHI", 0, tag, 0) if draw(st.booleans()) else b"")
        val = draw(st.binary(max_size=70))
        els[-1] = struct.pack("<HHI", 0, tag, len(val)) + val
    return b"".join(els)


# ------------------------------------------------------------------ C-FIND identifiers

QUERY_KEYWORDS = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                  "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber",
                  "ModalitiesInStudy", "StudyDescription", "SeriesInstanceUID", "Modality",
                  "SeriesNumber", "SOPInstanceUID", "InstanceNumber", "SOPClassUID",
                  "NumberOfStudyRelatedInstances", "IssuerOfPatientID", "ReferringPhysicianName",
                  "SpecificCharacterSet", "RetrieveAETitle", "InstanceAvailability",
                  "StudyID", "OtherPatientIDsSequence"]
query_values = st.one_of(
    st.sampled_from(["", "*", "?", "**", "DOE*", "DOE^J?NE", "20240101-", "-20240101",
                     "20240101-20240102", "1.2.1\\1.2.2", "\\\\\\", "%", "_", "[A]",
                     "'; DROP TABLE study; --", "\0", "ü*", "A" * 70000, "1" * 300,
                     "19700101000000-0500", "CT\\MR", "2024", "-"]),
    st.text(max_size=40),
)


VRS = ["AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UI",
       "UL", "US", "SS", "FD", "FL", "OB", "OW", "UN", "UT", "UC", "SQ", "XX"]
_LONG_VRS = {"OB", "OW", "UN", "UT", "UC", "SQ", "OF", "OD", "OL", "UR"}


def _explicit(tag: int, vr: str, value: bytes, *, undefined: bool = False) -> bytes:
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode("latin-1")[:2].ljust(2)
    length = 0xFFFFFFFF if undefined else len(value)
    if vr in _LONG_VRS:
        return head + b"\0\0" + struct.pack("<L", length) + value
    return head + struct.pack("<H", len(value) & 0xFFFF) + value


def _implicit(tag: int, value: bytes, *, undefined: bool = False) -> bytes:
    length = 0xFFFFFFFF if undefined else len(value)
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, length) + value


@st.composite
def identifiers(draw: Any) -> tuple[bytes, bool]:
    """An encoded C-FIND identifier as it arrives in P-DATA: (bytes, implicit VR?), with
    values of any kind, wrong VRs, lying lengths, nested sequences, odd character sets."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    implicit = draw(st.booleans())
    els: dict[int, bytes] = {}

    def put(tag: int, vr: str, value: bytes, undefined: bool = False) -> None:
        if len(value) % 2 and not undefined:
            value += b" "
        els[tag] = (_implicit(tag, value, undefined=undefined) if implicit
                    else _explicit(tag, vr, value, undefined=undefined))

    if draw(st.integers(0, 9)):
        put(0x00080052, "CS", draw(st.sampled_from(
            [b"PATIENT", b"STUDY", b"SERIES", b"IMAGE", b"", b"study", b"FRAME", b"X" * 20])))
    if draw(st.integers(0, 3)) == 0:
        put(0x00080005, "CS", draw(st.sampled_from(
            [b"ISO_IR 100", b"ISO_IR 192", b"ISO 2022 IR 87", b"GB18030", b"NONSENSE", b"",
             b"ISO_IR 100\\ISO 2022 IR 149"])))
    for _ in range(draw(st.integers(0, 8))):
        kw = draw(st.sampled_from(QUERY_KEYWORDS))
        tag = tag_for_keyword(kw)
        assert tag is not None
        vr = str(dictionary_VR(tag))
        kind = draw(st.integers(0, 5))
        if kw.endswith("Sequence") or kind == 0:
            inner = _implicit(0x00100020, b"X1") if implicit else _explicit(0x00100020, "LO",
                                                                             b"X1")
            for _ in range(draw(st.integers(0, 60))):
                item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + inner
                item += struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
                seq = item + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
                inner = (_implicit(tag, seq, undefined=True) if implicit
                         else _explicit(tag, "SQ", seq, undefined=True))
            els[tag] = inner
            continue
        if kind == 1:
            vr = draw(st.sampled_from(VRS))
        value = draw(query_values)
        raw = value.encode(draw(st.sampled_from(["utf-8", "latin-1"])), "replace")
        if kind == 2:
            raw = draw(st.binary(max_size=40))
        put(tag, vr, raw)
    data = b"".join(els[t] for t in sorted(els))
    if draw(st.integers(0, 4)) == 0:
        data = draw(mutated(data, max_ops=3))
    return data, implicit


# ------------------------------------------------------------------ Part 10

def seed_part10() -> bytes:
    import io

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.9.7433.9.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.9.7433.9.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.9.7433.9.3"
    ds.PatientID = "FUZZ"
    ds.PatientName = "FUZZ^SEED"
    ds.Modality = "CT"
    ds.StudyDate = "20260101"
    ds.Rows = 4
    ds.Columns = 4
    ds.BitsAllocated = 16
    ds.PixelData = b"\0" * 32
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


part10_files = st.one_of(mutated(seed_part10(), max_ops=4), st.binary(max_size=400),
                         mutated(seed_part10()[:132] + b"\x02\x00\x00\x00UL\x04\x00" +
                                 b"\xff\xff\xff\xff", max_ops=2))
