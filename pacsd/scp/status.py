"""Named DIMSE status values (PS3.4 / PS3.7 Annex C), so handlers never return bare numbers."""

from pydicom.dataset import Dataset


def dataset(code: int, comment: str = "") -> Dataset:
    """A status Dataset for a handler to return: Status and, when given, ErrorComment."""
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


SUCCESS = 0x0000
REFUSED_NOT_AUTHORIZED = 0x0124  # PS3.7 C.5.x: the user/AE may not invoke this operation
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110
UNABLE_TO_PROCESS = 0xC001
PENDING = 0xFF00
PENDING_WARNING = 0xFF01
CANCEL = 0xFE00
IDENTIFIER_MISMATCH = 0xA900
MOVE_DESTINATION_UNKNOWN = 0xA801
SUBOPS_WARNING = 0xB000
SUBOPS_FAILED = 0xA702  # C-MOVE/C-GET: unable to perform sub-operations (all failed)
