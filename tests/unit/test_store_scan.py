"""store/scan.py reads the same indexed attributes pydicom does, or declines."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from pacsd.store import ingest, scan
from pacsd.store.objects import SpoolFile

from .test_store_ingest import make_dataset, part10


def spooled(tmp_path: Path, data: bytes) -> SpoolFile:
    sp = SpoolFile(tmp_path)
    sp.write(data)
    return sp


def both(tmp_path: Path, data: bytes) -> tuple[Any, Any]:
    """(scanner's header or None, pydicom's header or the exception it raised)."""
    sp = spooled(tmp_path, data)
    try:
        fast = ingest._scanned_header(sp)
        try:
            slow: Any = ingest._header(ingest._parse_header(sp))
        except Exception as exc:
            slow = exc
        return fast, slow
    finally:
        sp.abort()


def with_sequences(ds: Dataset, undefined: bool) -> Dataset:
    inner = Dataset()
    inner.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    inner.ReferencedSOPInstanceUID = "1.2.3.4"
    deeper = Dataset()
    deeper.CodeValue = "T-D3000"
    deeper.CodingSchemeDesignator = "SRT"
    inner.PurposeOfReferenceCodeSequence = Sequence([deeper])
    ds.ReferencedImageSequence = Sequence([inner, Dataset()])
    ds.ProcedureCodeSequence = Sequence([])
    for seq in (ds.ReferencedImageSequence, ds.ProcedureCodeSequence,
                inner.PurposeOfReferenceCodeSequence):
        seq.is_undefined_length = undefined
        for item in seq:
            item.is_undefined_length_sequence_item = undefined
    return ds


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("undefined", [False, True])
def test_agrees_with_pydicom_on_ordinary_objects(tmp_path: Path, ts: str,
                                                 undefined: bool) -> None:
    ds = with_sequences(make_dataset(pixels=5000), undefined)
    ds.IssuerOfPatientID = "HOSP"
    ds.SpecificCharacterSet = "ISO_IR 100"
    fast, slow = both(tmp_path, part10(ds, ts))
    assert fast is not None
    assert fast == slow
    assert fast.sop_instance_uid == ds.SOPInstanceUID and fast.series_number == 2


def test_encapsulated_transfer_syntaxes_use_explicit_vr(tmp_path: Path) -> None:
    ds = make_dataset()
    meta = ingest.filemeta.file_meta_bytes
    explicit = meta(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian)
    jpeg = meta(ds.SOPClassUID, ds.SOPInstanceUID, JPEGBaseline8Bit)
    fast, slow = both(tmp_path, jpeg + part10(ds)[len(explicit):])
    assert fast is not None and fast == slow


@pytest.mark.parametrize("name", ["Müller^Hans", "山田^太郎"])
def test_non_ascii_values_are_left_to_pydicom(tmp_path: Path, name: str) -> None:
    ds = make_dataset(patient_name=name, charset="ISO_IR 192")
    assert scan.scan(part10(ds), True) is None


def test_declines_big_endian_deflated_and_foreign_files(tmp_path: Path) -> None:
    ds = make_dataset()
    data = part10(ds)
    meta_len = len(ingest.filemeta.file_meta_bytes(ds.SOPClassUID, ds.SOPInstanceUID,
                                                   ExplicitVRLittleEndian))
    for ts in ("1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99", "1.2.3.4"):
        other = ingest.filemeta.file_meta_bytes(ds.SOPClassUID, ds.SOPInstanceUID, ts)
        assert scan.scan(other + data[meta_len:], True) is None
    assert scan.scan(data[128:], True) is None  # no preamble
    assert scan.scan(b"", True) is None


def test_a_truncated_head_is_declined_unless_the_header_is_complete(tmp_path: Path) -> None:
    ds = make_dataset(pixels=5000)
    data = part10(ds)
    assert scan.scan(data, False) is not None  # PixelData (7FE0) ends the header
    assert scan.scan(data[:400], False) is None
    assert scan.scan(data[:400], True) is None


def test_mutated_inputs_never_accept_what_pydicom_refuses(tmp_path: Path) -> None:
    """Seeded byte flips, truncations and insertions of undefined lengths: whenever the
    scanner answers, pydicom parses too and finds the same header."""
    rng = random.Random(20261129)
    base = [part10(with_sequences(make_dataset(pixels=200), u), ts)
            for u in (False, True) for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)]
    answered = 0
    for i in range(600):
        data = bytearray(rng.choice(base))
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(132, len(data))
            kind = rng.random()
            if kind < 0.6:
                data[pos] = rng.randrange(256)
            elif kind < 0.8:
                del data[pos:pos + rng.randint(1, 8)]
            else:
                data[pos:pos] = b"\xff\xff\xff\xff"
        fast, slow = both(tmp_path, bytes(data))
        if fast is None:
            continue
        answered += 1
        assert not isinstance(slow, Exception), (i, slow)
        assert fast == slow, i
    assert answered > 50  # the comparison ran on a good share of inputs
