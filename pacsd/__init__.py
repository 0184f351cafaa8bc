"""pacsd: a standalone DICOM network node whose security holds when tested."""

__version__ = "0.1.0"
