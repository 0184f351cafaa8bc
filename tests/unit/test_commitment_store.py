"""store/commitment.py: parsing, the per-instance check, and the persistent queue."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pacsd import config
from pacsd.store import commitment as c
from pacsd.store.index import open_index_db
from pacsd.store.objects import IntegrityError

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


# ---------------------------------------------------------------------------- parsing
def test_parse_items_accepts_a_valid_request() -> None:
    txn, items = c.parse_items("1.2.3", [(CT, "1.2.3.4"), (b"1.2.840.10008.5.1.4.1.1.4\x00",
                                                          "1.2.3.5 ")], max_items=10)
    assert txn == "1.2.3"
    assert items == [c.Item(CT, "1.2.3.4"), c.Item(MR, "1.2.3.5")]


@pytest.mark.parametrize(("txn", "items", "status", "words"), [
    (None, [(CT, "1.2.3")], c.INVALID_ARGUMENT_VALUE, "no Transaction UID"),
    ("1.2.x", [(CT, "1.2.3")], c.INVALID_ARGUMENT_VALUE, "Transaction UID is not"),
    ("1.2.3", None, c.INVALID_ARGUMENT_VALUE, "no Referenced SOP Sequence"),
    ("1.2.3", [], c.INVALID_ARGUMENT_VALUE, "empty"),
    ("1.2.3", [(CT, None)], c.INVALID_ARGUMENT_VALUE, "lacks"),
    ("1.2.3", [(None, "1.2.3")], c.INVALID_ARGUMENT_VALUE, "lacks"),
    ("1.2.3", [(CT, "1.02.3")], c.INVALID_ARGUMENT_VALUE, "invalid UID"),
    ("1.2.3", [(CT, "1." + "2" * 70)], c.INVALID_ARGUMENT_VALUE, "invalid UID"),
    ("1.2.3", [(CT, f"1.2.{k}") for k in range(6)], c.RESOURCE_LIMITATION, "more than 5"),
])
def test_parse_items_refusals(txn: Any, items: Any, status: int, words: str) -> None:
    with pytest.raises(c.RequestError) as err:
        c.parse_items(txn, items, max_items=5)
    assert err.value.status == status
    assert words in err.value.comment


def test_parse_items_stops_at_the_cap_without_reading_everything() -> None:
    def endless() -> Any:
        k = 0
        while True:
            k += 1
            yield CT, f"1.2.{k}"

    with pytest.raises(c.RequestError) as err:
        c.parse_items("1.2.3", endless(), max_items=100)
    assert err.value.status == c.RESOURCE_LIMITATION


# ---------------------------------------------------------------------------- the index
@pytest.fixture
def db(tmp_path: Path) -> Any:
    cfg = config.parse(f'[storage]\nindex = "{tmp_path}/index.sqlite"\n', tmp_path / "x.toml")
    d = open_index_db(cfg)
    yield d
    d.close()


def _add_instance(db: Any, uid: str, cls_uid: str, sha: str, study: str = "1.9.1") -> None:
    now = "2026-01-01T00:00:00+00:00"
    db.execute_sql("INSERT OR IGNORE INTO patient (patient_id, created, updated) "
                   "VALUES ('P', ?, ?)", (now, now))
    db.execute_sql("INSERT OR IGNORE INTO study (patient_pk, study_instance_uid, created, "
                   "updated) VALUES (1, ?, ?, ?)", (study, now, now))
    st = db.execute_sql("SELECT pk FROM study WHERE study_instance_uid = ?",
                        (study,)).fetchone()[0]
    db.execute_sql("INSERT OR IGNORE INTO series (study_pk, series_instance_uid, created, "
                   "updated) VALUES (?, ?, ?, ?)", (st, study + ".1", now, now))
    se = db.execute_sql("SELECT pk FROM series WHERE series_instance_uid = ?",
                        (study + ".1",)).fetchone()[0]
    db.execute_sql("INSERT INTO instance (series_pk, sop_instance_uid, sop_class_uid, sha256, "
                   "size, transfer_syntax, received) VALUES (?, ?, ?, ?, 1, '1.2', ?)",
                   (se, uid, cls_uid, sha, now))


class FakeReader:
    """Objects by sha256: good, corrupt (hashes elsewhere) or missing."""

    def __init__(self, good: set[str], corrupt: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.good = good
        self.corrupt = corrupt
        self.opened: list[str] = []

    def open_verified(self, sha: str) -> Any:
        self.opened.append(sha)
        if sha in self.good:
            return io.BytesIO(b"x")
        actual = "f" * 64 if sha in self.corrupt else None
        raise IntegrityError("bad", sha256=sha, path=Path("/x"), actual=actual)


def test_check_reasons(db: Any) -> None:
    good, bad, gone = "a" * 64, "b" * 64, "c" * 64
    _add_instance(db, "1.1", CT, good)
    _add_instance(db, "1.2", CT, bad, study="1.9.2")
    _add_instance(db, "1.3", MR, good)  # same object content under two UIDs: verified once
    _add_instance(db, "1.4", CT, gone)
    reader = FakeReader({good}, {bad})
    items = [c.Item(CT, "1.1"), c.Item(CT, "1.2"), c.Item(CT, "1.3"), c.Item(CT, "9.9"),
             c.Item(MR, "1.3"), c.Item(CT, "1.4")]
    r = c.check(db, reader, items)
    assert r.committed == [c.Item(CT, "1.1"), c.Item(MR, "1.3")]
    assert r.failed == [(c.Item(CT, "1.2"), 0x0110), (c.Item(CT, "1.3"), 0x0119),
                        (c.Item(CT, "9.9"), 0x0112), (c.Item(CT, "1.4"), 0x0110)]
    assert r.event_type == 2
    assert sorted(reader.opened) == sorted([good, bad, gone])
    assert [(p.sop_instance_uid, p.study_uid, p.reason) for p in r.integrity] == [
        ("1.2", "1.9.2", "checksum mismatch"), ("1.4", "1.9.1", "missing")]
    assert r.studies == {"1.9.1"}
    again = c.Result.from_json(r.to_json())
    assert (again.committed, again.failed, again.studies) == (r.committed, r.failed, r.studies)


def test_check_all_committed_and_duplicate(db: Any) -> None:
    sha = "d" * 64
    _add_instance(db, "2.1", CT, sha)
    reader = FakeReader({sha})
    assert c.check(db, reader, [c.Item(CT, "2.1")]).event_type == 1
    dup = c.check(db, reader, [c.Item(CT, "2.1"), c.Item(CT, "2.2")], duplicate=True)
    assert dup.committed == [] and {r for _, r in dup.failed} == {0x0131}


def test_check_many_items_spans_lookup_chunks(db: Any) -> None:
    sha = "e" * 64
    with db.atomic():
        for k in range(1200):
            _add_instance(db, f"3.{k}", CT, sha)
    items = [c.Item(CT, f"3.{k}") for k in range(1200)] + [c.Item(CT, "3.99999")]
    r = c.check(db, FakeReader({sha}), items)
    assert len(r.committed) == 1200 and r.failed == [(c.Item(CT, "3.99999"), 0x0112)]


def test_check_with_a_real_object_store(tmp_path: Path, db: Any) -> None:
    from pacsd.store.objects import ObjectStore

    objects = ObjectStore(tmp_path / "objects")
    objects.ensure()
    with objects.spool() as spool:
        spool.write(b"DICM-ish bytes")
        sha = spool.finish()
        objects.publish(spool)
    assert sha == hashlib.sha256(b"DICM-ish bytes").hexdigest()
    _add_instance(db, "4.1", CT, sha)
    assert c.check(db, objects, [c.Item(CT, "4.1")]).committed == [c.Item(CT, "4.1")]
    objects.path_for(sha).write_bytes(b"DICM-ish byteZ")
    r = c.check(db, objects, [c.Item(CT, "4.1")])
    assert r.failed == [(c.Item(CT, "4.1"), 0x0110)] and r.integrity[0].actual_sha256


# ---------------------------------------------------------------------------- the queue
def _record(db: Any, txn: str = "1.5.1", owner: str = "me", now: float = 1000.0,
            lease: float = 60, deadline: float = 5000) -> tuple[int, bool]:
    return c.record(db, transaction_uid=txn, items=[c.Item(CT, "1.1")], calling_ae="MOD",
                    source_ip="127.0.0.1", assoc_id="ab", username="", now=now,
                    deadline=deadline, owner=owner, lease=lease)


def test_record_load_and_duplicate_transaction(db: Any) -> None:
    pk, dup = _record(db)
    assert not dup
    req = c.load(db, pk)
    assert req is not None and req.items == (c.Item(CT, "1.1"),) and req.state == c.PENDING
    assert req.result is None and req.calling_ae == "MOD"
    pk2, dup2 = _record(db)
    assert dup2 and pk2 != pk and c.load(db, pk2).duplicate  # type: ignore[union-attr]


def test_claims_respect_owner_lease_and_dead_owners(db: Any) -> None:
    pk, _ = _record(db, owner="w1", now=1000, lease=60)
    alive = {"w1": True}
    # claimed by a live owner within its lease: not free
    assert c.claim_due(db, owner="w2", now=1001, lease=60, alive=alive.get) == []
    # the owner died (kill -9): free at once
    alive["w1"] = False
    assert c.claim_due(db, owner="w2", now=1001, lease=60, alive=alive.get) == [pk]
    # now w2 holds it; w3 cannot take it, not even after w2's lease if ... it can
    assert c.claim_due(db, owner="w3", now=1002, lease=60, alive=lambda _: True) == []
    assert c.claim_due(db, owner="w3", now=1062, lease=60, alive=lambda _: True) == [pk]


def test_attempts_back_off_then_expire(db: Any) -> None:
    pk, _ = _record(db, owner="w1", now=1000, deadline=1000 + 10)
    assert c.mark_attempt_failed(db, pk, error="down", now=1000, interval=1,
                                 max_interval=4) == (1, False)
    assert c.claim_due(db, owner="w1", now=1000.5, lease=60) == []  # not due yet
    assert c.next_due(db) == 1001.0
    assert c.claim_due(db, owner="w1", now=1001, lease=60) == [pk]
    assert c.mark_attempt_failed(db, pk, error="down", now=1001, interval=1,
                                 max_interval=4) == (2, False)  # next at 1003
    assert c.mark_attempt_failed(db, pk, error="down", now=1003, interval=1,
                                 max_interval=4) == (3, False)  # next at 1007
    assert c.mark_attempt_failed(db, pk, error="still down", now=1007, interval=1,
                                 max_interval=4) == (4, True)  # 1011 > deadline
    req = c.load(db, pk)
    assert req is not None and req.state == c.FAILED and req.last_error == "still down"
    assert c.claim_due(db, owner="w1", now=99999, lease=60) == []
    assert c.next_due(db) is None


def test_backoff_doubles_and_caps() -> None:
    assert [c.backoff(n, 30, 900) for n in range(1, 8)] == [30, 60, 120, 240, 480, 900, 900]


def test_delivered_and_result_kept(db: Any) -> None:
    pk, _ = _record(db)
    res = c.Result(committed=[c.Item(CT, "1.1")])
    c.save_result(db, pk, res)
    c.save_result(db, pk, c.Result(failed=[(c.Item(CT, "1.1"), 0x0110)]))  # first one kept
    req = c.load(db, pk)
    assert req is not None and req.result is not None and req.result.committed == res.committed
    c.mark_delivered(db, pk)
    req = c.load(db, pk)
    assert req is not None and req.state == c.DELIVERED and req.attempts == 1
    assert c.claim_due(db, owner="x", now=1e12, lease=1) == []


def test_owner_token_liveness() -> None:
    me = c.owner_token()
    assert c.owner_alive(me)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    host = me.split(":")[0]
    assert not c.owner_alive(f"{host}:{proc.pid}:{me.rsplit(':', 1)[1]}")
    assert not c.owner_alive(f"{host}:{os.getpid()}:1")  # a reused pid started at another time
    assert c.owner_alive("some-other-host:1:1")  # other hosts: only the lease bounds them


def test_purge_finished_keeps_pending_and_recent(db: Any) -> None:
    import time

    old_pk, _ = _record(db, txn="1.7.1")
    c.mark_delivered(db, old_pk)
    pending_pk, _ = _record(db, txn="1.7.2")
    assert c.purge_finished(db, time.time() - 3600) == 0  # finished just now: kept
    assert c.purge_finished(db, time.time() + 1) == 1
    assert c.load(db, old_pk) is None and c.load(db, pending_pk) is not None
