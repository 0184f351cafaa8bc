"""C-FIND and retrieve identifiers -> parameterized SQL over the index (DESIGN §6, PS3.4 C.2.2.2).

`parse(identifier, model)` checks an identifier against the information model (Patient Root
or Study Root) and its Query/Retrieve Level and returns a `Query`; `find(query, ...)` runs
it and yields one response identifier per match. Matching, per PS3.4 C.2.2.2:

- single value: equality (person names optionally case-insensitive, `[query]
  case_insensitive_names`, against the upper-cased twin column);
- UID list (`\\`-separated, UI attributes): `IN (?, ?, ...)`, at most MAX_UID_LIST values;
- wildcard `*` and `?`: SQLite GLOB (case-sensitive, like DICOM), every other character
  escaped (`[` becomes `[[]`; `%` and `_` are plain characters in GLOB), plus a range on
  the literal prefix so an index serves it; `*` alone is universal matching;
- date, time and datetime ranges `A-B`, `A-`, `-B` on DA/TM/DT (string comparison: the
  index keeps values as sent); an empty stored value never matches a range or a value;
- universal matching: an empty value matches everything and only asks for the attribute.

Values from the identifier are only ever bound as parameters; column names come from the
fixed tables below. Nothing here imports pynetdicom.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import peewee
from peewee import JOIN, fn
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag

from pacsd.store.index import ATTRIBUTES, UPPER_TWINS, Instance, Patient, Series, Study

PATIENT_ROOT = "PATIENT"
STUDY_ROOT = "STUDY"
LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
MODEL_LEVELS = {PATIENT_ROOT: LEVELS, STUDY_ROOT: LEVELS[1:]}
UNIQUE_KEYS = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
MAX_UID_LIST = 1000  # values in one UID list; longer lists are refused (A700)

# Status values (PS3.4 C.4.1.1.4); pacsd.scp.status names the same numbers for handlers.
OUT_OF_RESOURCES = 0xA700
IDENTIFIER_MISMATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000

# Attributes that may appear in any identifier and are not matched on.
_NOT_KEYS = frozenset({
    0x00080005,  # SpecificCharacterSet
    0x00080052,  # QueryRetrieveLevel
    0x00080201,  # TimezoneOffsetFromUTC
    0x00080054,  # RetrieveAETitle (returned as ours)
    0x00080056,  # InstanceAvailability (returned as ONLINE)
})

# The level of every attribute we know; an unknown attribute belongs to the query level.
_LEVEL_OF: dict[str, str] = {
    "PatientID": "PATIENT", "IssuerOfPatientID": "PATIENT", "PatientName": "PATIENT",
    "PatientBirthDate": "PATIENT", "PatientSex": "PATIENT",
    "NumberOfPatientRelatedStudies": "PATIENT", "NumberOfPatientRelatedSeries": "PATIENT",
    "NumberOfPatientRelatedInstances": "PATIENT",
    "StudyInstanceUID": "STUDY", "StudyDate": "STUDY", "StudyTime": "STUDY",
    "AccessionNumber": "STUDY", "StudyID": "STUDY", "StudyDescription": "STUDY",
    "ModalitiesInStudy": "STUDY", "ReferringPhysicianName": "STUDY",
    "NumberOfStudyRelatedSeries": "STUDY", "NumberOfStudyRelatedInstances": "STUDY",
    "SOPClassesInStudy": "STUDY",
    "SeriesInstanceUID": "SERIES", "Modality": "SERIES", "SeriesNumber": "SERIES",
    "SeriesDescription": "SERIES", "NumberOfSeriesRelatedInstances": "SERIES",
    "SOPInstanceUID": "IMAGE", "SOPClassUID": "IMAGE", "InstanceNumber": "IMAGE",
}
# In the Study Root model the patient attributes are study-level keys.
_STUDY_ROOT_LEVEL = {"PATIENT": "STUDY"}

_WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_RANGE_VRS = frozenset({"DA", "TM", "DT"})
_COMPUTED = frozenset({
    "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
    "NumberOfPatientRelatedInstances", "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances", "ModalitiesInStudy", "SOPClassesInStudy",
    "NumberOfSeriesRelatedInstances",
})
_NO_VALIDATION = pydicom_config.IGNORE
_TABLE_OF_LEVEL = {"PATIENT": Patient, "STUDY": Study, "SERIES": Series, "IMAGE": Instance}


class QueryError(Exception):
    """An identifier the SCP cannot serve; carries the DIMSE status to answer with."""

    def __init__(self, status: int, comment: str, offending: int | None = None) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment
        self.offending = offending  # tag of the element at fault, when there is one


@dataclass(frozen=True)
class Key:
    """One attribute of an identifier: what to match (value) and what to return."""

    keyword: str
    tag: int
    vr: str
    value: str  # as sent, decoded; '' = universal matching
    level: str


@dataclass
class Query:
    """A checked identifier: model, level and keys in the order they were sent."""

    model: str
    level: str
    keys: list[Key]
    charset: list[str] = field(default_factory=list)  # SpecificCharacterSet of the request
    other: dict[int, str] = field(default_factory=dict)  # RetrieveAETitle etc. requested

    def key(self, keyword: str) -> Key | None:
        for k in self.keys:
            if k.keyword == keyword:
                return k
        return None

    def summary(self) -> dict[str, Any]:
        """What an audit record may carry: level, model and the keys sent with a value
        (keyword only: values may be PHI)."""
        return {"model": self.model, "level": self.level,
                "query_keys": [k.keyword for k in self.keys if k.value]}


# ---------------------------------------------------------------------------- parsing
def _text(elem: Any) -> str:
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value).strip()
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip()
    return str(value).strip()


def _level_of(keyword: str, model: str, query_level: str) -> str:
    level = _LEVEL_OF.get(keyword, query_level)
    if model == STUDY_ROOT:
        level = _STUDY_ROOT_LEVEL.get(level, level)
    return level


def parse(identifier: Dataset, model: str) -> Query:
    """Check a C-FIND/C-MOVE/C-GET identifier and return it as a Query.

    Raises QueryError (A900) for a missing or wrong Query/Retrieve Level or a key below it,
    (A700) for an over-long UID list, (C000) for an identifier that does not decode.
    """
    if model not in MODEL_LEVELS:
        raise ValueError(f"unknown information model {model!r}")
    try:
        level_elem = identifier.get((0x0008, 0x0052))
        level = _text(level_elem).upper() if level_elem is not None else ""
    except Exception as exc:
        raise QueryError(UNABLE_TO_PROCESS, f"identifier does not decode: {exc}") from None
    if not level:
        raise QueryError(IDENTIFIER_MISMATCH, "QueryRetrieveLevel (0008,0052) missing",
                         0x00080052)
    if level not in MODEL_LEVELS[model]:
        raise QueryError(IDENTIFIER_MISMATCH,
                         f"level {level[:16]} not in the {model.lower()} root model", 0x00080052)
    depth = LEVELS.index(level)
    query = Query(model=model, level=level, keys=[])
    try:
        for elem in identifier:
            tag = int(elem.tag)
            if tag & 0xFFFF == 0 or tag >> 16 in (0x0000, 0x0002) or elem.tag.is_private:
                continue
            if tag == 0x00080005:
                query.charset = [str(v) for v in (elem.value if isinstance(
                    elem.value, MultiValue | list) else [elem.value]) if v]
                continue
            if tag in _NOT_KEYS:
                query.other[tag] = elem.VR
                continue
            keyword = elem.keyword or keyword_for_tag(tag) or ""
            level_of = _level_of(keyword, model, level)
            if LEVELS.index(level_of) > depth:
                raise QueryError(IDENTIFIER_MISMATCH,
                                 f"{keyword or Tag(tag)} is below the {level} level", tag)
            dict_vr = _dict_vr(tag)
            vr = elem.VR if elem.VR not in ("UN", None) else dict_vr
            if keyword and ((vr == "SQ") != (dict_vr == "SQ") or (
                    vr != dict_vr and dict_vr != "UN" and " or " not in dict_vr)):
                # e.g. PatientName sent as a sequence or as DS: the response element could
                # not be built (TypeError, ValueError -> C001 "server fault"); it is the
                # peer's error (issue 9, bench/fuzz)
                raise QueryError(IDENTIFIER_MISMATCH, f"{keyword}: sent as {vr}, is {dict_vr}",
                                 tag)
            value = "" if vr == "SQ" else _text(elem)
            if vr == "UI" and value.count("\\") >= MAX_UID_LIST:
                raise QueryError(OUT_OF_RESOURCES,
                                 f"{keyword}: more than {MAX_UID_LIST} UIDs in one list", tag)
            query.keys.append(Key(keyword, tag, vr, value, level_of))
    except QueryError:
        raise
    except Exception as exc:
        raise QueryError(UNABLE_TO_PROCESS, f"identifier does not decode: {exc}") from None
    return query


def _dict_vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"


# ---------------------------------------------------------------------------- matching
def glob_pattern(value: str) -> str:
    """A DICOM wildcard value as a GLOB pattern: `*` and `?` keep their meaning, every
    other character matches only itself."""
    return "".join("[[]" if c == "[" else c for c in value)


def literal_prefix(value: str) -> str:
    """The characters before the first wildcard."""
    for i, c in enumerate(value):
        if c in "*?":
            return value[:i]
    return value


def _prefix_bounds(prefix: str) -> tuple[str, str] | None:
    """[low, high) holding every string that starts with `prefix` (for an index range)."""
    if not prefix:
        return None
    last = ord(prefix[-1])
    if last >= 0x10FFFF:
        return None
    return prefix, prefix[:-1] + chr(last + 1)


def _wildcard(column: Any, value: str) -> Any:
    cond = peewee.Expression(column, "GLOB", glob_pattern(value))
    bounds = _prefix_bounds(literal_prefix(value))
    if bounds:
        cond = (column >= bounds[0]) & (column < bounds[1]) & cond
    return cond


def _range(column: Any, vr: str, value: str) -> Any:
    low, _, high = (part.strip() for part in value.partition("-"))
    cond = column != ""
    if low:
        cond = cond & (column >= low)
    if high:
        # a partial time or datetime bound includes every value it is a prefix of
        cond = cond & (column <= (high if vr == "DA" else high + "\x7f"))
    return cond


def _condition(key: Key, column: Any, *, case_insensitive: bool) -> Any | None:
    """The WHERE term for one key, or None for universal matching."""
    value = key.value
    if not value or (value == "*" and key.vr not in _RANGE_VRS):
        return None
    if key.vr == "UI":
        uids = [u.strip() for u in value.split("\\") if u.strip()]
        if any("*" in u or "?" in u for u in uids):
            raise QueryError(IDENTIFIER_MISMATCH, f"{key.keyword}: wildcards in a UID",
                             key.tag)
        if not uids:  # only backslashes: was an IndexError answered as C001 (fuzzing)
            raise QueryError(IDENTIFIER_MISMATCH, f"{key.keyword}: empty UID list", key.tag)
        return column.in_(uids) if len(uids) > 1 else column == uids[0]
    if key.vr in ("IS", "US", "UL", "SS", "SL"):
        try:
            return column == int(value)
        except ValueError:
            raise QueryError(IDENTIFIER_MISMATCH, f"{key.keyword}: not a number",
                             key.tag) from None
    if key.vr in _RANGE_VRS:
        if value == "*":
            return None
        if "-" in value and not (key.vr == "DT" and _is_offset_only(value)):
            return _range(column, key.vr, value)
        return column == value
    if key.vr == "PN" and case_insensitive and key.keyword in UPPER_TWINS:
        column, value = UPPER_TWINS[key.keyword], value.upper()
    if key.vr in _WILDCARD_VRS and ("*" in value or "?" in value):
        return _wildcard(column, value)
    return column == value


def _is_offset_only(value: str) -> bool:
    """A DT value whose only '-' is a UTC offset sign (YYYYMMDDHHMMSS-hhmm)."""
    return value.count("-") == 1 and value.index("-") >= 8 and not value.endswith("-")


# ---------------------------------------------------------------------------- SQL
def _computed(keyword: str) -> Any:
    """Correlated subqueries for attributes the standard defines as computed."""
    se, ins, st = Series.alias("c_se"), Instance.alias("c_in"), Study.alias("c_st")
    if keyword == "NumberOfStudyRelatedSeries":
        return se.select(fn.COUNT(se.pk)).where(se.study == Study.pk)
    if keyword == "NumberOfStudyRelatedInstances":
        return (ins.select(fn.COUNT(ins.pk)).join(se, on=(ins.series == se.pk))
                .where(se.study == Study.pk))
    if keyword == "ModalitiesInStudy":
        return se.select(fn.GROUP_CONCAT(se.modality.distinct())).where(
            (se.study == Study.pk) & (se.modality != ""))
    if keyword == "SOPClassesInStudy":
        return (ins.select(fn.GROUP_CONCAT(ins.sop_class_uid.distinct()))
                .join(se, on=(ins.series == se.pk)).where(se.study == Study.pk))
    if keyword == "NumberOfSeriesRelatedInstances":
        return ins.select(fn.COUNT(ins.pk)).where(ins.series == Series.pk)
    if keyword == "NumberOfPatientRelatedStudies":
        return st.select(fn.COUNT(st.pk)).where(st.patient == Patient.pk)
    if keyword == "NumberOfPatientRelatedSeries":
        return (se.select(fn.COUNT(se.pk)).join(st, on=(se.study == st.pk))
                .where(st.patient == Patient.pk))
    if keyword == "NumberOfPatientRelatedInstances":
        return (ins.select(fn.COUNT(ins.pk)).join(se, on=(ins.series == se.pk))
                .join(st, on=(se.study == st.pk)).where(st.patient == Patient.pk))
    raise KeyError(keyword)


def _modalities_condition(key: Key) -> Any | None:
    """ModalitiesInStudy matches a study with a series of any listed modality."""
    mods = [m.strip() for m in key.value.split("\\") if m.strip() and m.strip() != "*"]
    if not mods:
        return None
    se = Series.alias("m_se")
    terms = [_wildcard(se.modality, m) if ("*" in m or "?" in m) else se.modality == m
             for m in mods]
    any_term = terms[0]
    for t in terms[1:]:
        any_term = any_term | t
    return fn.EXISTS(se.select(se.pk).where((se.study == Study.pk) & any_term))


def _base(level: str, columns: list[Any]) -> Any:
    if level == "PATIENT":
        return Patient.select(*columns)
    if level == "STUDY":
        return Study.select(*columns).join(Patient, JOIN.INNER, on=(Study.patient == Patient.pk))
    if level == "SERIES":
        return (Series.select(*columns)
                .join(Study, JOIN.INNER, on=(Series.study == Study.pk))
                .join(Patient, JOIN.INNER, on=(Study.patient == Patient.pk)))
    return (Instance.select(*columns)
            .join(Series, JOIN.INNER, on=(Instance.series == Series.pk))
            .join(Study, JOIN.INNER, on=(Series.study == Study.pk))
            .join(Patient, JOIN.INNER, on=(Study.patient == Patient.pk)))


@dataclass
class _Plan:
    select: Any
    returned: list[Key]  # keys whose value comes from the row, in column order
    empty: list[Key]  # requested keys we keep no value for: returned zero-length


def build(query: Query, *, case_insensitive: bool = False, limit: int | None = None) -> _Plan:
    """The peewee SELECT for a query (values bound as parameters), and how to read rows.

    Raises QueryError for a value that cannot be matched (wildcard UID, non-numeric IS).
    """
    unique = UNIQUE_KEYS[query.level]
    keys = list(query.keys)
    if query.key(unique) is None:
        tag = int(Tag(unique))
        keys.append(Key(unique, tag, _dict_vr(tag), "", query.level))
    columns: list[Any] = []
    returned: list[Key] = []
    empty: list[Key] = []
    where: list[Any] = []
    for k in keys:
        if k.keyword in _COMPUTED:
            columns.append(_computed(k.keyword))
            returned.append(k)
            if k.keyword == "ModalitiesInStudy":
                cond = _modalities_condition(k)
                if cond is not None:
                    where.append(cond)
            continue
        column = ATTRIBUTES.get(k.keyword)
        if column is None:
            empty.append(k)
            continue
        columns.append(column)
        returned.append(k)
        cond = _condition(k, column, case_insensitive=case_insensitive)
        if cond is not None:
            where.append(cond)
    select = _base(query.level, columns)
    if where:
        cond = where[0]
        for w in where[1:]:
            cond = cond & w
        select = select.where(cond)
    if limit is not None:
        select = select.limit(limit)
    return _Plan(select.tuples(), returned, empty)


# ---------------------------------------------------------------------------- results
def _value_for(key: Key, raw: Any) -> Any:
    if raw is None or raw == "":
        return None
    if key.keyword in ("ModalitiesInStudy", "SOPClassesInStudy"):
        return sorted(set(str(raw).split(",")))
    if isinstance(raw, int):
        return str(raw) if key.vr in ("IS", "DS") else raw
    if "\\" in str(raw) and key.vr != "PN":
        return str(raw).split("\\")
    return raw


def _charset_for(values: list[str], requested: list[str]) -> str | None:
    """The SpecificCharacterSet a response needs: None for ASCII, the request's own when
    it can encode every value, else UTF-8 (ISO_IR 192)."""
    text = "".join(values)
    if text.isascii():
        return requested[0] if requested and requested[0] in ("ISO_IR 100", "ISO_IR 192") \
            else None
    codecs = {"ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}
    if len(requested) == 1 and requested[0] in codecs:
        try:
            text.encode(codecs[requested[0]])
            return requested[0]
        except UnicodeEncodeError:
            pass
    return "ISO_IR 192"


def find(query: Query, *, limit: int, case_insensitive: bool = False,
         retrieve_ae: str = "") -> Iterator[Dataset]:
    """Run a checked query; yields at most `limit` + 1 response identifiers (the caller
    tells the peer when there were more than `limit`). Raises QueryError."""
    plan = build(query, case_insensitive=case_insensitive, limit=limit + 1)
    for row in _rows(plan):
        yield _dataset(query, plan, row, retrieve_ae)


def find_encoded(query: Query, *, limit: int, implicit_vr: bool,
                 case_insensitive: bool = False, retrieve_ae: str = "") -> Iterator[bytes]:
    """`find`, yielding each response identifier already encoded in Implicit (or Explicit)
    VR Little Endian: the bytes pydicom would write for `find`'s Dataset, without building
    one per match (which, with its encoding, was most of the cost of a match)."""
    plan = build(query, case_insensitive=case_insensitive, limit=limit + 1)
    encoder = _Encoder(query, plan, retrieve_ae, implicit_vr)
    for row in _rows(plan):
        out = encoder.encode(row)
        yield out if out is not None else encode_dataset(
            _dataset(query, plan, row, retrieve_ae), implicit_vr)


def _rows(plan: _Plan) -> Iterator[tuple[Any, ...]]:
    """The plan's rows straight from the cursor (peewee's row wrappers cost per row)."""
    sql, params = plan.select.sql()
    yield from plan.select.model._meta.database.execute_sql(sql, params)


def _dataset(query: Query, plan: _Plan, row: tuple[Any, ...], retrieve_ae: str) -> Dataset:
    ds = Dataset()
    texts: list[str] = []
    for k, raw in zip(plan.returned, row, strict=True):
        value = _value_for(k, raw)
        if isinstance(value, str):
            texts.append(value)
        # values come from our own index: skip pydicom's per-value validation
        ds[k.tag] = DataElement(k.tag, k.vr, value, validation_mode=_NO_VALIDATION)
    for k in plan.empty:
        ds.add_new(k.tag, k.vr, [] if k.vr == "SQ" else None)
    if 0x00080054 in query.other:
        ds.RetrieveAETitle = retrieve_ae
    if 0x00080056 in query.other:
        ds.InstanceAvailability = "ONLINE"
    ds.QueryRetrieveLevel = query.level
    charset = _charset_for(texts, query.charset)
    if charset:
        ds.SpecificCharacterSet = charset
    return ds


def encode_dataset(ds: Dataset, implicit_vr: bool) -> bytes:
    """A Dataset in Implicit or Explicit VR Little Endian, as pynetdicom encodes it."""
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = implicit_vr, True
    write_dataset(fp, ds)
    return bytes(fp.getvalue())


# Text VRs whose values the encoder writes itself (ASCII only; anything else is left to
# pydicom). Values are padded to even length with a space, UIs with NUL (PS3.5 6.2).
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH",
                       "ST", "TM", "UC", "UI", "UR", "UT"})
# Explicit VR: these have 2 reserved bytes and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR",
                       "UT", "UV"})
_SPLIT_LIST = frozenset({"ModalitiesInStudy", "SOPClassesInStudy"})
_TEXT, _LIST, _NUMBER, _OTHER = range(4)  # how _Encoder writes a row value (by key)
_NO_PACK = struct.Struct("<0s").pack  # placeholder packer of a constant step


@functools.lru_cache(maxsize=256)
def _constant_elements(empty: tuple[tuple[int, str], ...], retrieve_ae: str | None,
                       availability: bool, level: str, charset: str | None,
                       implicit_vr: bool) -> tuple[tuple[int, bytes], ...]:
    """The response elements that do not depend on the row, each encoded by pydicom
    (cached: the same few combinations come back request after request)."""
    const = Dataset()
    for tag, vr in empty:
        const.add_new(tag, vr, [] if vr == "SQ" else None)
    if retrieve_ae is not None:
        const.RetrieveAETitle = retrieve_ae
    if availability:
        const.InstanceAvailability = "ONLINE"
    const.QueryRetrieveLevel = level
    if charset:
        const.SpecificCharacterSet = charset
    out = []
    for elem in const:
        one = Dataset()
        one[elem.tag] = elem
        out.append((int(elem.tag), encode_dataset(one, implicit_vr)))
    return tuple(out)


class _Encoder:
    """Encodes one row of a plan as the response identifier `_dataset` would give.

    The elements whose value does not depend on the row (zero-length keys we keep no
    value for, RetrieveAETitle, InstanceAvailability, QueryRetrieveLevel and, for an
    all-ASCII row, SpecificCharacterSet) are encoded once, by pydicom; row values in a
    text VR are written here. `encode` returns None for a row it does not handle (a
    non-ASCII value, a number in a non-text VR): the caller encodes `_dataset` instead.
    """

    def __init__(self, query: Query, plan: _Plan, retrieve_ae: str, implicit_vr: bool) -> None:
        self.implicit = implicit_vr
        const = _constant_elements(
            tuple((k.tag, k.vr) for k in plan.empty),
            retrieve_ae if 0x00080054 in query.other else None,
            0x00080056 in query.other, query.level,
            _charset_for([], query.charset),  # what an all-ASCII row declares
            implicit_vr)
        # in tag order, as pydicom writes: (tag, constant bytes) or (tag, key, column)
        slots: list[tuple[int, bytes | None, int, Key | None]] = [
            (tag, data, -1, None) for tag, data in const]
        tags = {tag for tag, _ in const}
        for column, k in enumerate(plan.returned):
            if k.tag not in tags:
                slots.append((k.tag, None, column, k))
        slots.sort(key=lambda slot: slot[0])
        # per slot: (row column, header, length packer, pad byte, kind); a constant
        # element is (-1, its bytes, unused, unused, unused)
        self.steps: list[tuple[int, bytes, Callable[[int], bytes], bytes, int]] = []
        for tag, data, column, key in slots:
            if data is not None:
                self.steps.append((-1, data, _NO_PACK, b"", _OTHER))
                continue
            assert key is not None
            head, fmt = self._header(tag, key.vr)
            kind = (_OTHER if key.vr not in _TEXT_VRS else _LIST if key.keyword in _SPLIT_LIST
                    else _NUMBER if key.vr in ("IS", "DS") else _TEXT)
            self.steps.append((column, head, struct.Struct(fmt).pack,
                               b"\0" if key.vr == "UI" else b" ", kind))

    def _header(self, tag: int, vr: str) -> tuple[bytes, str]:
        """The element header up to its length field, and the length's struct format."""
        tag_bytes = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
        if self.implicit:
            return tag_bytes, "<I"
        if vr in _LONG_VRS:
            return tag_bytes + vr.encode("ascii") + b"\0\0", "<I"
        return tag_bytes + vr.encode("ascii"), "<H"

    def encode(self, row: tuple[Any, ...]) -> bytes | None:
        parts: list[bytes] = []
        append = parts.append
        for column, head, pack, pad, kind in self.steps:
            if column < 0:
                append(head)
                continue
            raw = row[column]
            if raw is None or raw == "":
                append(head + pack(0))
                continue
            if type(raw) is str:
                if kind == _OTHER:
                    return None  # not a text VR: pydicom's business
                if kind == _LIST:
                    raw = "\\".join(sorted(set(raw.split(","))))
                if not raw.isascii():
                    return None
                value = raw.encode("ascii")
            elif type(raw) is int and kind == _NUMBER:
                value = str(raw).encode("ascii")
            else:
                return None
            if len(value) % 2:
                value += pad
            try:
                append(head + pack(len(value)) + value)
            except struct.error:  # longer than a 16-bit length holds
                return None
        return b"".join(parts)


# ---------------------------------------------------------------------------- retrieve
@dataclass(frozen=True)
class Selected:
    """One instance a C-MOVE/C-GET identifier selects."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    sha256: str
    size: int
    study_uid: str


_RETRIEVE_KEYS = {  # the unique keys a retrieve identifier may carry, by level
    "PatientID": "PATIENT", "StudyInstanceUID": "STUDY", "SeriesInstanceUID": "SERIES",
    "SOPInstanceUID": "IMAGE",
}


def select_instances(query: Query, *, limit: int) -> list[Selected]:
    """Instances a retrieve identifier selects (unique keys only; PS3.4 C.4.2.2.1).

    Keys other than the unique keys are ignored; the unique key of the retrieve level must
    have a value (else the whole archive would match). More than `limit` matches, a
    wildcard or an empty level key raise QueryError.
    """
    level_key = query.key(UNIQUE_KEYS[query.level])
    if level_key is None or not level_key.value:
        raise QueryError(IDENTIFIER_MISMATCH,
                         f"{UNIQUE_KEYS[query.level]} needed for a {query.level} retrieve",
                         int(Tag(UNIQUE_KEYS[query.level])))
    where = []
    for k in query.keys:
        if k.keyword not in _RETRIEVE_KEYS or not k.value:
            continue
        column = ATTRIBUTES[k.keyword]
        if "*" in k.value or "?" in k.value:
            raise QueryError(IDENTIFIER_MISMATCH, f"{k.keyword}: wildcards in a retrieve",
                             k.tag)
        values = [v.strip() for v in k.value.split("\\") if v.strip()]
        if not values:  # only backslashes (fuzzing: an IndexError before)
            raise QueryError(IDENTIFIER_MISMATCH, f"{k.keyword}: empty value list", k.tag)
        where.append(column.in_(values) if len(values) > 1 else column == values[0])
    select = (Instance.select(Instance.sop_instance_uid, Instance.sop_class_uid,
                              Instance.transfer_syntax, Instance.sha256, Instance.size,
                              Study.study_instance_uid)
              .join(Series, JOIN.INNER, on=(Instance.series == Series.pk))
              .join(Study, JOIN.INNER, on=(Series.study == Study.pk))
              .join(Patient, JOIN.INNER, on=(Study.patient == Patient.pk)))
    cond = where[0]
    for w in where[1:]:
        cond = cond & w
    rows = list(select.where(cond).order_by(Study.pk, Series.series_number, Series.pk,
                                            Instance.instance_number, Instance.pk)
                .limit(limit + 1).tuples())
    if len(rows) > limit:
        raise QueryError(OUT_OF_RESOURCES,
                         f"more than {limit} instances selected; retrieve a smaller set")
    return [Selected(*row) for row in rows]  # type: ignore[misc]  # peewee rows are untyped
