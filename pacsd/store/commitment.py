"""Storage commitment (issue 8): persistent requests, the per-instance check, claiming.

A request is one row of the index table `commitment` (migration 2 in store/index.py),
written and committed before the N-ACTION response, so a restart never forgets it.
Each worker process runs a dispatcher (scp/commitment.py) that claims due rows with short
IMMEDIATE transactions: a claim names its owner (host, pid, process start time) and lasts
a lease; a row whose owner is gone or whose lease ran out is claimed again. The check of
the referenced instances runs once, its result is kept in the row, and every delivery
attempt sends that same result.

What "committed" means here: the instance is in the index, with the SOP Class the
modality names, and its object file hashes to the SHA-256 it is stored under (read in
full at commitment time). Failure reasons (PS3.4 J.3.2.1.1.2 / C.14.1.1):
0110 processing failure (object missing or corrupt, or a fault while checking),
0112 no such object instance, 0119 class/instance conflict, 0131 duplicate transaction UID.

Nothing here speaks DICOM networking; the caller supplies the database and the reader.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import peewee

from pacsd.store.ingest import valid_uid
from pacsd.store.objects import IntegrityError

PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
DUPLICATE_TRANSACTION_UID = 0x0131

# N-ACTION response statuses for requests refused whole (PS3.7 C.4.x)
INVALID_ARGUMENT_VALUE = 0x0115
RESOURCE_LIMITATION = 0x0213

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"

_LOOKUP_CHUNK = 500  # UIDs per IN (...) query, below SQLite's parameter limit
_SQL_LOOKUP = ("SELECT i.sop_instance_uid, i.sop_class_uid, i.sha256, st.study_instance_uid "
               "FROM instance i JOIN series se ON se.pk = i.series_pk "
               "JOIN study st ON st.pk = se.study_pk WHERE i.sop_instance_uid IN ")


class RequestError(ValueError):
    """An N-ACTION's Action Information that cannot be accepted; `status` is the DIMSE
    status to answer with (0115 invalid argument, 0213 resource limitation)."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


@dataclass(frozen=True)
class Item:
    """One referenced instance: (Referenced SOP Class UID, Referenced SOP Instance UID)."""

    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class IntegrityProblem:
    """An indexed object that did not verify (for the integrity.failure alert)."""

    sop_instance_uid: str
    study_uid: str
    sha256: str
    actual_sha256: str  # "" when the file is missing

    @property
    def reason(self) -> str:
        return "missing" if not self.actual_sha256 else "checksum mismatch"


@dataclass
class Result:
    """The outcome of checking one request: what is committed, what failed and why."""

    committed: list[Item] = field(default_factory=list)
    failed: list[tuple[Item, int]] = field(default_factory=list)
    integrity: list[IntegrityProblem] = field(default_factory=list)
    studies: set[str] = field(default_factory=set)

    @property
    def event_type(self) -> int:
        """N-EVENT-REPORT Event Type ID: 1 all committed, 2 failures exist."""
        return 2 if self.failed else 1

    def to_json(self) -> str:
        return json.dumps({
            "committed": [[i.sop_class_uid, i.sop_instance_uid] for i in self.committed],
            "failed": [[i.sop_class_uid, i.sop_instance_uid, r] for i, r in self.failed],
            "studies": sorted(self.studies),
        }, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Result:
        d = json.loads(text)
        return cls(committed=[Item(c, i) for c, i in d["committed"]],
                   failed=[(Item(c, i), int(r)) for c, i, r in d["failed"]],
                   studies=set(d.get("studies", [])))


@dataclass(frozen=True)
class Request:
    """A stored commitment request as the dispatcher sees it."""

    pk: int
    transaction_uid: str
    calling_ae: str
    source_ip: str
    assoc_id: str
    username: str
    duplicate: bool
    items: tuple[Item, ...]
    result: Result | None
    state: str
    attempts: int
    deadline: float
    last_error: str

    def audit_fields(self) -> dict[str, Any]:
        return {"transaction_uid": self.transaction_uid, "calling_ae": self.calling_ae,
                "source_ip": self.source_ip, "assoc_id": self.assoc_id,
                "user": self.username}


class VerifiedReader(Protocol):
    def open_verified(self, sha256: str) -> Any: ...


# --------------------------------------------------------------------------- parsing
def parse_items(transaction_uid: Any, items: Iterable[tuple[Any, Any]] | None, *,
                max_items: int) -> tuple[str, list[Item]]:
    """Validate an N-ACTION's Transaction UID and Referenced SOP Sequence values.

    `items` yields (class, instance) values as decoded (None when absent). Raises
    RequestError: 0115 for a missing/invalid Transaction UID, a missing or empty
    sequence, an item without both UIDs or with an invalid UID; 0213 beyond `max_items`.
    """
    txn = _text(transaction_uid)
    if not txn:
        raise RequestError(INVALID_ARGUMENT_VALUE, "no Transaction UID")
    if not valid_uid(txn):
        raise RequestError(INVALID_ARGUMENT_VALUE, "Transaction UID is not a valid UID")
    if items is None:
        raise RequestError(INVALID_ARGUMENT_VALUE, "no Referenced SOP Sequence")
    out: list[Item] = []
    for n, (cls_uid, inst_uid) in enumerate(items, 1):
        if n > max_items:
            raise RequestError(RESOURCE_LIMITATION, f"more than {max_items} referenced "
                               "instances (commitment.max_items)")
        c, i = _text(cls_uid), _text(inst_uid)
        if not (c and i):
            raise RequestError(INVALID_ARGUMENT_VALUE,
                               f"item {n} lacks Referenced SOP Class/Instance UID")
        if not (valid_uid(c) and valid_uid(i)):
            raise RequestError(INVALID_ARGUMENT_VALUE, f"item {n} has an invalid UID")
        out.append(Item(c, i))
    if not out:
        raise RequestError(INVALID_ARGUMENT_VALUE, "empty Referenced SOP Sequence")
    return txn, out


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).rstrip("\x00 ").strip()


# --------------------------------------------------------------------------- checking
def check(db: peewee.SqliteDatabase, reader: VerifiedReader, items: Sequence[Item],
          *, duplicate: bool = False) -> Result:
    """Check each referenced instance: indexed, same SOP Class, object verifies.

    Never raises for a problem with one instance (it becomes a failure with its reason);
    a database error while looking instances up fails those instances with 0110.
    """
    result = Result()
    if duplicate:
        result.failed = [(i, DUPLICATE_TRANSACTION_UID) for i in items]
        return result
    rows: dict[str, tuple[str, str, str]] = {}
    lookup_failed = False
    uids = sorted({i.sop_instance_uid for i in items})
    try:
        for start in range(0, len(uids), _LOOKUP_CHUNK):
            chunk = uids[start:start + _LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            cur = _exec(db, _SQL_LOOKUP + f"({marks})", tuple(chunk))  # only ? marks
            for uid, cls_uid, sha, study in cur.fetchall():
                rows[str(uid)] = (str(cls_uid), str(sha), str(study))
    except (peewee.DatabaseError, sqlite3.Error):
        lookup_failed = True
    verified: dict[str, bool] = {}
    for item in items:
        if lookup_failed:
            result.failed.append((item, PROCESSING_FAILURE))
            continue
        row = rows.get(item.sop_instance_uid)
        if row is None:
            result.failed.append((item, NO_SUCH_OBJECT_INSTANCE))
            continue
        cls_uid, sha, study = row
        if cls_uid != item.sop_class_uid:
            result.failed.append((item, CLASS_INSTANCE_CONFLICT))
            continue
        if sha not in verified:
            verified[sha] = _verify(reader, sha, item, study, result)
        if verified[sha]:
            result.committed.append(item)
            result.studies.add(study)
        else:
            result.failed.append((item, PROCESSING_FAILURE))
    return result


def _verify(reader: VerifiedReader, sha: str, item: Item, study: str, result: Result) -> bool:
    try:
        f = reader.open_verified(sha)
    except IntegrityError as exc:
        result.integrity.append(IntegrityProblem(item.sop_instance_uid, study, sha,
                                                 exc.actual or ""))
        return False
    except OSError:
        return False
    with contextlib.suppress(Exception):
        f.close()
    return True


# --------------------------------------------------------------------------- the queue
def owner_token() -> str:
    """Who holds a claim: host, pid and the process's start time (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"


def _start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else ""


def owner_alive(token: str) -> bool:
    """False when the claim's owner is a process of this host that no longer runs.

    Owners on other hosts are presumed alive (their lease bounds the claim)."""
    host, _, rest = token.partition(":")
    pid_text, _, started = rest.partition(":")
    if host != socket.gethostname():
        return True
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    return bool(_start_time(pid)) and _start_time(pid) == started


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def _exec(db: peewee.SqliteDatabase, query: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
    return db.execute_sql(query, params)  # type: ignore[no-any-return]  # peewee is untyped


def record(db: peewee.SqliteDatabase, *, transaction_uid: str, items: Sequence[Item],
           calling_ae: str, source_ip: str, assoc_id: str, username: str, now: float,
           deadline: float, owner: str, lease: float) -> tuple[int, bool]:
    """Write a request durably (committed when this returns), claimed by `owner`.

    Returns (pk, duplicate): duplicate is True when the Transaction UID was already used,
    in which case the report fails every instance with 0131. Raises peewee.DatabaseError.
    """
    payload = json.dumps([[i.sop_class_uid, i.sop_instance_uid] for i in items],
                         separators=(",", ":"))
    with db.atomic("IMMEDIATE"):
        dup = _exec(db, "SELECT 1 FROM commitment WHERE transaction_uid = ? LIMIT 1",
                    (transaction_uid,)).fetchone() is not None
        cur = _exec(db, "INSERT INTO commitment (transaction_uid, calling_ae, source_ip, "
                    "assoc_id, username, received, duplicate, items, state, next_attempt, "
                    "deadline, claimed_by, claim_until) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (transaction_uid, calling_ae, source_ip, assoc_id, username, _now_iso(),
                     int(dup), payload, PENDING, now, deadline, owner, now + lease))
        pk = int(cur.lastrowid or 0)
    return pk, dup


def claim_due(db: peewee.SqliteDatabase, *, owner: str, now: float, lease: float,
              limit: int = 16, alive: Callable[[str], bool] = owner_alive) -> list[int]:
    """Atomically claim up to `limit` pending rows that are due and free (unclaimed, lease
    expired, or owned by a process that is gone); returns their pks."""
    with db.atomic("IMMEDIATE"):
        rows = _exec(db, "SELECT pk, claimed_by, claim_until FROM commitment "
                     "WHERE state = ? AND next_attempt <= ? ORDER BY next_attempt LIMIT ?",
                     (PENDING, now, limit * 4)).fetchall()
        free = [int(pk) for pk, by, until in rows
                if by is None or until is None or until < now
                or (by != owner and not alive(str(by)))][:limit]
        for pk in free:
            _exec(db, "UPDATE commitment SET claimed_by = ?, claim_until = ? WHERE pk = ?",
                  (owner, now + lease, pk))
    return free


def next_due(db: peewee.SqliteDatabase) -> float | None:
    """The earliest next_attempt of any pending row (None when nothing is pending)."""
    row = _exec(db, "SELECT min(next_attempt) FROM commitment WHERE state = ?",
                (PENDING,)).fetchone()
    return None if row is None or row[0] is None else float(row[0])


def load(db: peewee.SqliteDatabase, pk: int) -> Request | None:
    row = _exec(db, "SELECT pk, transaction_uid, calling_ae, source_ip, assoc_id, username, "
                "duplicate, items, result, state, attempts, deadline, last_error "
                "FROM commitment WHERE pk = ?", (pk,)).fetchone()
    if row is None:
        return None
    return Request(
        pk=int(row[0]), transaction_uid=str(row[1]), calling_ae=str(row[2]),
        source_ip=str(row[3]), assoc_id=str(row[4]), username=str(row[5]),
        duplicate=bool(row[6]), items=tuple(Item(c, i) for c, i in json.loads(row[7])),
        result=Result.from_json(row[8]) if row[8] else None, state=str(row[9]),
        attempts=int(row[10]), deadline=float(row[11]), last_error=str(row[12]))


def save_result(db: peewee.SqliteDatabase, pk: int, result: Result) -> None:
    with db.atomic("IMMEDIATE"):
        _exec(db, "UPDATE commitment SET result = ? WHERE pk = ? AND result IS NULL",
              (result.to_json(), pk))


def mark_delivered(db: peewee.SqliteDatabase, pk: int) -> None:
    with db.atomic("IMMEDIATE"):
        _exec(db, "UPDATE commitment SET state = ?, attempts = attempts + 1, "
              "claimed_by = NULL, claim_until = NULL, last_error = '', finished = ? "
              "WHERE pk = ?", (DELIVERED, _now_iso(), pk))


def backoff(attempts: int, interval: float, max_interval: float) -> float:
    """Seconds before the next attempt after `attempts` failed ones (doubling, capped)."""
    return float(min(max_interval, interval * 2 ** max(0, min(attempts - 1, 30))))


def mark_attempt_failed(db: peewee.SqliteDatabase, pk: int, *, error: str, now: float,
                        interval: float, max_interval: float) -> tuple[int, bool]:
    """Count a failed delivery; schedule the next or give up past the deadline.

    Returns (attempts so far, expired). An expired request is state 'failed'.
    """
    with db.atomic("IMMEDIATE"):
        row = _exec(db, "SELECT attempts, deadline FROM commitment WHERE pk = ?",
                    (pk,)).fetchone()
        if row is None:
            return 0, True
        attempts = int(row[0]) + 1
        nxt = now + backoff(attempts, interval, max_interval)
        expired = nxt > float(row[1])
        if expired:
            _exec(db, "UPDATE commitment SET state = ?, attempts = ?, last_error = ?, "
                  "claimed_by = NULL, claim_until = NULL, finished = ? WHERE pk = ?",
                  (FAILED, attempts, error[:500], _now_iso(), pk))
        else:
            _exec(db, "UPDATE commitment SET attempts = ?, last_error = ?, next_attempt = ?, "
                  "claimed_by = NULL, claim_until = NULL WHERE pk = ?",
                  (attempts, error[:500], nxt, pk))
    return attempts, expired


def release(db: peewee.SqliteDatabase, pk: int, owner: str) -> None:
    """Give up our claim without counting an attempt (e.g. the worker stops)."""
    with db.atomic("IMMEDIATE"):
        _exec(db, "UPDATE commitment SET claimed_by = NULL, claim_until = NULL "
              "WHERE pk = ? AND claimed_by = ?", (pk, owner))


def renew(db: peewee.SqliteDatabase, pk: int, owner: str, until: float) -> None:
    with db.atomic("IMMEDIATE"):
        _exec(db, "UPDATE commitment SET claim_until = ? WHERE pk = ? AND claimed_by = ?",
              (until, pk, owner))


def purge_finished(db: peewee.SqliteDatabase, before: float) -> int:
    """Delete delivered and failed requests finished before `before` (epoch); how many."""
    cutoff = dt.datetime.fromtimestamp(before, dt.UTC).isoformat(timespec="microseconds")
    with db.atomic("IMMEDIATE"):
        cur = _exec(db, "DELETE FROM commitment WHERE state != ? AND finished < ?",
                    (PENDING, cutoff))
    return int(cur.rowcount or 0)
