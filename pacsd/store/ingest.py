"""`Store`: the one way an object enters the store, for C-STORE and `pacsd import` alike.

An object is acknowledged (status SUCCESS) only after its bytes are fsynced, renamed to
their content address, the directory fsynced and the index rows committed (DESIGN §5).
Every failure returns a failure status and leaves neither a file nor a row behind.
`ingest` never raises for bad input or a full disk: it returns an IngestResult, so a
DIMSE handler only maps it.

DIMSE statuses (one place, PS3.4 B.2.3 / PS3.7 C.4):
  SUCCESS            0x0000
  OUT_OF_RESOURCES   0xA700  free space below [storage] min_free_mb, object above
                             max_object_mb, or an I/O or database error (retryable)
  DATASET_MISMATCH   0xA900  the dataset's SOP Class/Instance UID differ from the request,
                             or the Study/Series Instance UID the IOD requires is missing
  CANNOT_UNDERSTAND  0xC000  the bytes do not parse as a dataset, the dataset has no SOP
                             Class/Instance UID at all, or a UID is malformed (syntax, > 64)
  DUPLICATE_REJECTED 0x0111  on_duplicate = "reject" and the SOP Instance UID is stored;
                             PS3.7 C.4 general status "Duplicate SOP Instance" (Failure)
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import sqlite3
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import peewee
import structlog
from pydicom.dataset import Dataset
from pydicom.filereader import read_partial

from pacsd.config import Config
from pacsd.dbutil import WriterLock
from pacsd.store import filemeta, scan
from pacsd.store.index import open_index_db
from pacsd.store.objects import READ_CHUNK, ObjectStore, SpoolFile

log = structlog.get_logger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
DUPLICATE_REJECTED = 0x0111

_MB = 1024 * 1024
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_LAST_INDEXED_TAG = scan.LAST_INDEXED_TAG


def valid_uid(uid: str) -> bool:
    """PS3.5 9.1: at most 64 characters, digit components separated by dots, no leading 0."""
    return 0 < len(uid) <= 64 and bool(_UID_RE.match(uid))


@dataclass(frozen=True)
class Origin:
    """Who sent an object: recorded on its instance row."""

    calling_ae: str
    source_ip: str
    username: str = ""
    assoc_id: str = ""


@dataclass(frozen=True)
class IngestResult:
    """The outcome of one ingest; `status` is the DIMSE status to answer with."""

    status: int
    stored: bool  # a new object file/row was committed
    duplicate: bool  # the SOP Instance UID was already in the index
    sha256: str
    size: int
    study_uid: str
    patient_id: str
    message: str

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


# --------------------------------------------------------------------------- parsing


def _parse_header(spool: SpoolFile) -> Dataset:
    """Parse the dataset up to group 0x0020 from the in-memory head, else from the file."""
    stopped = False

    def stop(tag: Any, vr: Any, length: int) -> bool:
        nonlocal stopped
        if tag > _LAST_INDEXED_TAG:
            stopped = True
            return True
        return False

    head_error: Exception | None = None
    try:
        ds = read_partial(io.BytesIO(spool.head), stop_when=stop)
        if spool.head_complete or stopped:
            return ds
    except Exception as exc:  # any parser failure: the file decides
        if spool.head_complete:
            raise
        head_error = exc
    stopped = False
    with spool.open_plaintext() as f:  # decrypts when the spool is an envelope
        ds = read_partial(f, stop_when=stop, defer_size=4096)
    if head_error is not None:
        log.debug("store.head_parse_fallback", error=str(head_error))
    return ds


def _raw_ascii(ds: Dataset, keyword: str) -> str | None:
    """The value straight from its raw bytes when they are plain ASCII (the common case:
    the same in every character set, no pydicom conversion); None when that cannot be
    decided from the raw bytes."""
    try:
        elem = ds.get_item(keyword)
    except Exception:
        return None
    if elem is None:
        return ""
    raw = elem.value
    if isinstance(raw, bytes) and raw.isascii() and b"\x1b" not in raw:
        return raw.decode("ascii").strip(" \x00")
    return None


def _text(ds: Dataset, keyword: str) -> str:
    """A value as str ('' when absent or undecodable); multi-values joined with '\\'.
    Non-ASCII values are decoded by pydicom per SpecificCharacterSet."""
    fast = _raw_ascii(ds, keyword)
    if fast is not None:
        return fast
    try:
        value = ds.get(keyword)
    except Exception:
        return ""
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _uid(ds: Dataset, tag: int) -> str:
    """A UID from its raw bytes: no pydicom value conversion (which warns or raises on a
    malformed UID); we judge validity ourselves. '' when absent."""
    try:
        elem = ds.get_item(tag)
    except Exception:
        return ""
    if elem is None:
        return ""
    value = elem.value
    if isinstance(value, bytes):
        return value.rstrip(b"\x00 ").decode("ascii", "replace").strip()
    return "" if value is None else str(value).strip()


def _int(text: str) -> int | None:
    """An IS value as int; None when absent, multi-valued or not a number."""
    try:
        return int(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class _Header:
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    charset: str
    patient: dict[str, str]
    study: dict[str, str]
    modality: str
    series_number: int | None
    series_description: str
    instance_number: int | None


def _header(ds: Dataset) -> _Header:
    """The indexed attributes of a dataset pydicom parsed."""
    return _make_header(lambda keyword: _text(ds, keyword), lambda tag: _uid(ds, tag))


def _scanned_header(spool: SpoolFile) -> _Header | None:
    """The same from the raw head without pydicom (store/scan.py); None: use pydicom."""
    values = scan.scan(spool.head, spool.head_complete)
    if values is None:
        return None

    def text(keyword: str) -> str:
        raw = values.get(keyword)
        return "" if raw is None else raw.decode("ascii").strip(" \x00")

    def uid(tag: int) -> str:
        raw = values.get(scan.WANTED[tag])
        return "" if raw is None else raw.rstrip(b"\x00 ").decode("ascii").strip()

    return _make_header(text, uid)


def _make_header(text: Callable[[str], str], uid: Callable[[int], str]) -> _Header:
    name = text("PatientName")
    referring = text("ReferringPhysicianName")
    return _Header(
        sop_class_uid=uid(0x00080016),
        sop_instance_uid=uid(0x00080018),
        study_uid=uid(0x0020000D),
        series_uid=uid(0x0020000E),
        charset=text("SpecificCharacterSet"),
        patient={
            "patient_id": text("PatientID"),
            "issuer_of_patient_id": text("IssuerOfPatientID"),
            "patient_name": name,
            "patient_name_upper": name.upper(),
            "patient_birth_date": text("PatientBirthDate"),
            "patient_sex": text("PatientSex"),
        },
        study={
            "study_date": text("StudyDate"),
            "study_time": text("StudyTime"),
            "accession_number": text("AccessionNumber"),
            "study_id": text("StudyID"),
            "study_description": text("StudyDescription"),
            "referring_physician_name": referring,
            "referring_physician_name_upper": referring.upper(),
        },
        modality=text("Modality"),
        series_number=_int(text("SeriesNumber")),
        series_description=text("SeriesDescription"),
        instance_number=_int(text("InstanceNumber")),
    )


def _validate(h: _Header, sop_class_uid: str, sop_instance_uid: str,
              transfer_syntax: str) -> None:
    if not h.sop_class_uid or not h.sop_instance_uid:
        raise _Refused(CANNOT_UNDERSTAND, "dataset has no SOP Class/Instance UID")
    for label, uid in (("request SOP Class UID", sop_class_uid),
                       ("request SOP Instance UID", sop_instance_uid),
                       ("transfer syntax UID", transfer_syntax),
                       ("SOP Class UID", h.sop_class_uid),
                       ("SOP Instance UID", h.sop_instance_uid)):
        if not valid_uid(uid):
            raise _Refused(CANNOT_UNDERSTAND, f"invalid {label} {uid[:80]!r}")
    if h.sop_class_uid != sop_class_uid:
        raise _Refused(DATASET_MISMATCH, f"dataset SOP Class UID {h.sop_class_uid} differs "
                                         f"from the request's {sop_class_uid}")
    if h.sop_instance_uid != sop_instance_uid:
        raise _Refused(DATASET_MISMATCH, f"dataset SOP Instance UID {h.sop_instance_uid} "
                                         f"differs from the request's {sop_instance_uid}")
    for label, uid in (("Study Instance UID", h.study_uid),
                       ("Series Instance UID", h.series_uid)):
        if not uid:
            raise _Refused(DATASET_MISMATCH, f"{label} missing")
        if not valid_uid(uid):
            raise _Refused(CANNOT_UNDERSTAND, f"invalid {label} {uid[:80]!r}")


# --------------------------------------------------------------------------- Part 10 files


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}


def read_part10_meta(f: io.BufferedReader) -> dict[int, bytes]:
    """Read preamble + group 0002 of a Part 10 file; leaves `f` at the dataset's first byte.

    Returns {element number: raw value}. Raises ValueError when it is not a Part 10 file.
    """
    pre = f.read(132)
    if len(pre) < 132 or pre[128:] != b"DICM":
        raise ValueError("not a DICOM Part 10 file (no DICM preamble)")
    meta: dict[int, bytes] = {}
    while True:
        pos = f.tell()
        hdr = f.read(8)
        if len(hdr) < 8:
            break
        group, element, vr = struct.unpack("<HH2s", hdr[:6])
        if group != 0x0002:
            f.seek(pos)
            break
        if vr in _LONG_VRS:
            extra = f.read(4)
            if len(extra) < 4:
                raise ValueError("truncated file meta information")
            (length,) = struct.unpack("<I", extra)
        else:
            (length,) = struct.unpack("<H", hdr[6:8])
        if length > 1_000_000:
            raise ValueError("implausible file meta element length")
        value = f.read(length)
        if len(value) < length:
            raise ValueError("truncated file meta information")
        meta[element] = value
    return meta


def _uid_value(raw: bytes | None) -> str:
    if raw is None:
        return ""
    return raw.rstrip(b"\x00 ").decode("ascii", "replace").strip()


# --------------------------------------------------------------------------- Store


class Store:
    """The object files plus their index; one per process, used from many threads."""

    def __init__(self, cfg: Config, db: peewee.SqliteDatabase, objects: ObjectStore,
                 swept: int = 0) -> None:
        self.cfg = cfg
        self.db = db
        self.objects = objects
        self.swept = swept  # temp leftovers removed at open
        self._min_free = cfg.storage.min_free_mb * _MB
        self._max_object = cfg.storage.max_object_mb * _MB or None
        self._on_duplicate = cfg.storage.on_duplicate
        # Index writers of every worker queue here, in order, rather than in SQLite's
        # sleeping, unfair busy handler (dbutil.WriterLock; issue 9, bench/ingest K=4).
        self._write_lock = WriterLock(db.database)

    @classmethod
    def open(cls, cfg: Config) -> Store:
        """Open/migrate the index, create root and root/.tmp (0700), sweep crash leftovers.

        Raises EnvironmentProblem (database; with encryption on, a missing or wrong key
        file: checked first, so nothing is written then) or OSError (root not creatable).
        """
        objects = ObjectStore.for_config(cfg)
        db = open_index_db(cfg)
        objects.ensure()
        swept = objects.sweep_tmp(
            lambda sha: _exec(db, "SELECT 1 FROM instance WHERE sha256 = ? LIMIT 1",
                              (sha,)).fetchone() is not None)
        if swept:
            log.info("store.swept_temp_files", count=swept, dir=str(objects.tmp))
        return cls(cfg, db, objects, swept)

    def close(self) -> None:
        self._write_lock.close()
        if not self.db.is_closed():
            self.db.close()

    # -- receiving ------------------------------------------------------------------
    def free_bytes(self) -> int:
        st = os.statvfs(self.objects.root)
        return st.f_bavail * st.f_frsize

    def spool(self, **_ignored: Any) -> SpoolFile:
        """A new SpoolFile in root/.tmp, limited so that it cannot eat the min_free_mb
        reserve or exceed max_object_mb (beyond that it only counts bytes).

        Keyword arguments are ignored, so this can stand in for NamedTemporaryFile.
        """
        allowance = self.free_bytes() - self._min_free
        limit = allowance if self._max_object is None else min(allowance, self._max_object)
        return self.objects.spool(limit=max(limit, 0))

    def ingest(self, spool: SpoolFile, *, sop_class_uid: str, sop_instance_uid: str,
               transfer_syntax: str, origin: Origin) -> IngestResult:
        """Validate, publish and index one received Part 10 file; never raises for bad
        input or resource trouble (the result carries the status). The spool is consumed:
        published or removed."""
        published: str | None = None
        size = spool.size
        try:
            if spool.over_limit:
                if getattr(spool, "disk_full", False):
                    raise _Refused(OUT_OF_RESOURCES, "file system full while receiving")
                if self._max_object is not None and spool.size > self._max_object:
                    raise _Refused(OUT_OF_RESOURCES, f"object of {spool.size} bytes exceeds "
                                   f"storage.max_object_mb={self.cfg.storage.max_object_mb}")
                raise _Refused(OUT_OF_RESOURCES, "free space below storage.min_free_mb="
                               f"{self.cfg.storage.min_free_mb}")
            if self.free_bytes() < self._min_free:
                raise _Refused(OUT_OF_RESOURCES, "free space below storage.min_free_mb="
                               f"{self.cfg.storage.min_free_mb}")
            try:
                h = _scanned_header(spool) or _header(_parse_header(spool))
            except Exception as exc:
                raise _Refused(CANNOT_UNDERSTAND,
                               f"dataset does not parse: {str(exc)[:200]}") from None
            _validate(h, str(sop_class_uid), str(sop_instance_uid), str(transfer_syntax))

            existing = self._existing(h.sop_instance_uid)
            if existing is not None and self._on_duplicate != "replace":
                return self._duplicate(existing, h, size)

            published = spool.digest()  # set first: a failed publish must be undone too
            self.objects.publish(spool)
            replacing = existing is not None and existing[0] != published
            with (self.objects.removal_marker(existing[0]) if replacing and existing
                  else contextlib.nullcontext()):
                outcome, old_sha = self._index(h, published, size, str(transfer_syntax),
                                               origin, spool.key_version)
                if old_sha and old_sha != published:
                    self._discard_if_unreferenced(old_sha)
            if outcome != "stored":  # raced with another store of the same UID
                self._discard_if_unreferenced(published)
                existing = self._existing(h.sop_instance_uid)
                assert existing is not None
                return self._duplicate(existing, h, size)
            return IngestResult(SUCCESS, True, existing is not None, published, size,
                                h.study_uid, h.patient["patient_id"], "stored")
        except _Refused as exc:
            self._cleanup(spool, published)
            return IngestResult(exc.status, False, False, "", size, "", "", str(exc))
        except (OSError, peewee.DatabaseError) as exc:
            log.error("store.ingest_failed", error=str(exc), sop_instance_uid=sop_instance_uid)
            self._cleanup(spool, published)
            return IngestResult(OUT_OF_RESOURCES, False, False, "", size, "", "",
                                f"storage error: {exc}")
        except Exception as exc:  # a bug must still answer with a status, not crash
            log.exception("store.ingest_bug", sop_instance_uid=sop_instance_uid)
            self._cleanup(spool, published)
            return IngestResult(CANNOT_UNDERSTAND, False, False, "", size, "", "",
                                f"internal error: {type(exc).__name__}")
        finally:
            spool.abort()  # the temp name (after publish only a second link) goes

    def _existing(self, sop_instance_uid: str) -> tuple[str, int] | None:
        """(sha256, size) of the stored instance with this UID, if any."""
        row = _exec(self.db, "SELECT sha256, size FROM instance WHERE sop_instance_uid = ?",
                    (sop_instance_uid,)).fetchone()
        return None if row is None else (str(row[0]), int(row[1]))

    def _duplicate(self, existing: tuple[str, int], h: _Header, size: int) -> IngestResult:
        if self._on_duplicate == "reject":
            raise _Refused(DUPLICATE_REJECTED, f"SOP Instance UID {h.sop_instance_uid} "
                           "already stored (storage.on_duplicate=reject)")
        return IngestResult(SUCCESS, False, True, existing[0], existing[1],
                            h.study_uid, h.patient["patient_id"], "duplicate kept")

    def _cleanup(self, spool: SpoolFile, published: str | None) -> None:
        try:
            spool.abort()
        finally:
            if published is not None:
                self._discard_if_unreferenced(published)

    def _discard_if_unreferenced(self, sha256: str) -> None:
        try:
            cur = _exec(self.db, "SELECT 1 FROM instance WHERE sha256 = ? LIMIT 1", (sha256,))
            if cur.fetchone() is None:
                self.objects.remove(sha256)
        except Exception:
            log.exception("store.cleanup_failed", sha256=sha256)

    def _index(self, h: _Header, sha256: str, size: int, transfer_syntax: str,
               origin: Origin, key_version: int | None = None) -> tuple[str, str | None]:
        """Upsert patient/study/series/instance in one short write transaction.

        Returns ("stored", previous sha256 or None) or ("duplicate", None) when another
        writer stored the UID first and the policy keeps or rejects. Plain parameterized
        SQL (no query building): this runs once per received instance.
        """
        now = _now()
        sql = functools.partial(_exec, self.db)
        with self._write_lock, self.db.atomic("IMMEDIATE"):
            row = sql(_SQL_INSTANCE_BY_UID, (h.sop_instance_uid,)).fetchone()
            if row is not None and self._on_duplicate != "replace":
                return "duplicate", None
            key_cols: tuple[str, ...] = ("patient_id", "issuer_of_patient_id")
            if not h.patient["patient_id"]:  # no ID: never merge strangers into one row
                key_cols += ("patient_name", "patient_birth_date")
            patient_pk = _upsert(sql, "patient", {k: h.patient[k] for k in key_cols},
                                 {**h.patient, "specific_charset": h.charset}, now)

            def study_values(current: dict[str, Any] | None) -> dict[str, Any]:
                modalities = set(filter(None, (current or {}).get("modalities_in_study", "")
                                        .split("\\")))
                if h.modality:
                    modalities.add(h.modality)
                return {**h.study, "specific_charset": h.charset,
                        "modalities_in_study": "\\".join(sorted(modalities))}

            study_pk = _upsert(sql, "study", {"study_instance_uid": h.study_uid},
                               study_values, now, {"patient_pk": patient_pk})
            series_pk = _upsert(sql, "series", {"series_instance_uid": h.series_uid},
                                {"modality": h.modality, "series_number": h.series_number,
                                 "series_description": h.series_description},
                                now, {"study_pk": study_pk})
            values = (series_pk, h.sop_class_uid, h.instance_number, sha256, size,
                      transfer_syntax, now, origin.calling_ae, origin.source_ip,
                      origin.username, origin.assoc_id, key_version)
            if row is None:
                sql(_SQL_INSTANCE_INSERT, (h.sop_instance_uid, *values))
                return "stored", None
            sql(_SQL_INSTANCE_UPDATE, (*values, row[0]))
            return "stored", str(row[1])

    # -- import ---------------------------------------------------------------------
    def ingest_part10_file(self, path: str | Path, origin: Origin) -> IngestResult:
        """Ingest an existing Part 10 file: our file meta + its dataset bytes as they are.

        Returns a failure result (C000) for a file that is not Part 10; raises OSError when
        the file cannot be read.
        """
        with open(path, "rb") as f:
            try:
                meta = read_part10_meta(f)
            except ValueError as exc:
                return IngestResult(CANNOT_UNDERSTAND, False, False, "", 0, "", "", str(exc))
            sop_class = _uid_value(meta.get(0x0002))
            sop_instance = _uid_value(meta.get(0x0003))
            ts = _uid_value(meta.get(0x0010))
            if not (sop_class and sop_instance and ts):
                return IngestResult(CANNOT_UNDERSTAND, False, False, "", 0, "", "",
                                    "file meta lacks SOP Class/Instance or Transfer Syntax UID")
            if not all(map(valid_uid, (sop_class, sop_instance, ts))):
                # before packing: a non-ASCII "UID" raised UnicodeEncodeError there (fuzzing)
                return IngestResult(CANNOT_UNDERSTAND, False, False, "", 0, "", "",
                                    "file meta holds an invalid UID")
            spool = self.spool()
            try:
                spool.write(filemeta.file_meta_bytes(sop_class, sop_instance, ts))
                buf = bytearray(READ_CHUNK)
                view = memoryview(buf)
                while n := f.readinto(view):
                    spool.write(view[:n])
            except BaseException:
                spool.abort()
                raise
        return self.ingest(spool, sop_class_uid=sop_class, sop_instance_uid=sop_instance,
                           transfer_syntax=ts, origin=origin)

    # -- reading --------------------------------------------------------------------
    def open_verified(self, sha256: str) -> Any:
        """See ObjectStore.open_verified; raises IntegrityError."""
        return self.objects.open_verified(sha256)

    def verified_path(self, sha256: str) -> Path:
        """See ObjectStore.verified_path; raises IntegrityError."""
        return self.objects.verified_path(sha256)


_INSTANCE_COLUMNS = ("series_pk", "sop_class_uid", "instance_number", "sha256", "size",
                     "transfer_syntax", "received", "calling_ae", "source_ip", "username",
                     "assoc_id", "key_version")
_SQL_INSTANCE_BY_UID = "SELECT pk, sha256 FROM instance WHERE sop_instance_uid = ?"
_SQL_INSTANCE_INSERT = (
    f"INSERT INTO instance (sop_instance_uid, {', '.join(_INSTANCE_COLUMNS)}) "  # noqa: S608
    f"VALUES ({', '.join('?' * (len(_INSTANCE_COLUMNS) + 1))})"
)
_SQL_INSTANCE_UPDATE = (
    f"UPDATE instance SET {', '.join(c + ' = ?' for c in _INSTANCE_COLUMNS)} "  # noqa: S608
    "WHERE pk = ?"
)


def _exec(db: peewee.SqliteDatabase, query: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
    return db.execute_sql(query, params)  # type: ignore[no-any-return]


def _upsert(sql: Callable[..., sqlite3.Cursor], table: str, keys: dict[str, Any],
            values: dict[str, Any] | Any, now: str,
            insert_only: dict[str, Any] | None = None) -> int:
    """Find the row of `table` with `keys`, insert it or update changed `values`; its pk.

    `values` is a dict or a function of the current row (None when new) returning one;
    the latest object wins for descriptive attributes. Table and column names are our
    constants; every value is a parameter.
    """
    cols = tuple(values(None)) if callable(values) else tuple(values)
    where = " AND ".join(f"{k} = ?" for k in keys)
    cur = sql(f"SELECT pk, {', '.join(cols)} FROM {table} WHERE {where}",  # noqa: S608
              tuple(keys.values()))
    found = cur.fetchone()
    if found is None:
        new = values(None) if callable(values) else values
        row = {**keys, **(insert_only or {}), **new, "created": now, "updated": now}
        cur = sql(f"INSERT INTO {table} ({', '.join(row)}) "  # noqa: S608
                  f"VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
        assert cur.lastrowid is not None
        return cur.lastrowid
    current = dict(zip(cols, found[1:], strict=True))
    new = values(current) if callable(values) else values
    changed = {k: v for k, v in new.items() if current.get(k) != v}
    if changed:
        sets = ", ".join(f"{k} = ?" for k in changed)
        sql(f"UPDATE {table} SET {sets}, updated = ? WHERE pk = ?",  # noqa: S608
            (*changed.values(), now, found[0]))
    return int(found[0])
