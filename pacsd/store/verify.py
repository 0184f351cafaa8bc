"""`pacsd verify`: recompute the SHA-256 of every object and compare store and index.

Problems:
  corrupt  an object's content does not hash to its name (or, encrypted, a GCM tag fails)
  missing  an instance row whose object file is gone
  orphan   a file under the root that no row references (also stray names and crash
           leftovers in root/.tmp that no live process holds)

Safe while `serve` runs: memory stays flat (rows and files are streamed), and a
candidate problem is re-checked at the end, so an ingest or replace in progress is not
reported. Nothing is changed or removed.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pacsd.config import Config
from pacsd.errors import EXIT_OK, EXIT_PROBLEM
from pacsd.store.envelope import EnvelopeError
from pacsd.store.index import Instance, open_index_db
from pacsd.store.ingest import Store
from pacsd.store.objects import ObjectStore


@dataclass(frozen=True)
class Problem:
    kind: str  # corrupt | missing | orphan
    path: str
    sha256: str = ""
    sop_instance_uid: str = ""
    detail: str = ""

    def line(self) -> str:
        uid = f" (SOP Instance UID {self.sop_instance_uid})" if self.sop_instance_uid else ""
        return f"{self.kind}: {self.path}{uid}: {self.detail}"


@dataclass
class VerifyReport:
    checked: int = 0  # objects hashed
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def count(self, kind: str) -> int:
        return sum(1 for p in self.problems if p.kind == kind)

    def summary(self) -> str:
        return (f"verified {self.checked} objects ({self.bytes} bytes): "
                f"{self.count('corrupt')} corrupt, {self.count('missing')} missing, "
                f"{self.count('orphan')} orphan")

    def as_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "checked": self.checked, "bytes": self.bytes,
                "corrupt": self.count("corrupt"), "missing": self.count("missing"),
                "orphan": self.count("orphan"),
                "problems": [asdict(p) for p in self.problems]}


ProblemHook = Callable[[Problem], None]


def verify_all(store: Store | ObjectStore,
               on_problem: ProblemHook | None = None) -> VerifyReport:
    """Scrub every object and row. The index models must be bound (Store.open does it).

    `on_problem` is called once per confirmed problem (the audit trail hooks
    `integrity.failure` here). Raises OSError only when the root itself is unreadable.
    """
    objects = store.objects if isinstance(store, Store) else store
    report = VerifyReport()
    suspects: list[Problem] = []

    rows = (Instance.select(Instance.sop_instance_uid, Instance.sha256)
            .order_by(Instance.pk).tuples().iterator())
    for uid, sha in rows:
        try:
            path = objects.path_for(sha)
        except ValueError:
            suspects.append(Problem("corrupt", "-", sha, uid, "index row holds an invalid "
                                                             "sha256"))
            continue
        try:
            actual = objects.hash_object(path)  # an envelope: every GCM tag checked too
        except FileNotFoundError:
            suspects.append(Problem("missing", str(path), sha, uid, "object file missing"))
            continue
        except EnvelopeError as exc:
            report.checked += 1
            suspects.append(Problem("corrupt", str(path), sha, uid, f"envelope: {exc}"))
            continue
        report.checked += 1
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile by a replace
            report.bytes += path.stat().st_size
        if actual != sha:
            suspects.append(Problem("corrupt", str(path), sha, uid,
                                    f"content hashes to {actual}"))

    if objects.root.is_dir():
        for path, sha in objects.walk():
            if sha is None:
                suspects.append(Problem("orphan", str(path), "", "", "not an object name"))
            elif not Instance.select().where(Instance.sha256 == sha).exists():
                suspects.append(Problem("orphan", str(path), sha, "", "no index row"))
        for path in objects.temp_leftovers():
            suspects.append(Problem("orphan", str(path), "", "", "temp file left by a crash"))

    for p in suspects:
        if _still_a_problem(objects, p):
            report.problems.append(p)
            if on_problem is not None:
                on_problem(p)
    return report


def _still_a_problem(objects: ObjectStore, p: Problem) -> bool:
    """Re-check a suspect, so work that was in flight during the scan is not reported."""
    if p.kind == "missing":
        row = Instance.get_or_none(Instance.sop_instance_uid == p.sop_instance_uid)
        return row is not None and not objects.path_for(row.sha256).exists()
    if p.kind == "orphan" and p.sha256:
        return (Path(p.path).exists()
                and not Instance.select().where(Instance.sha256 == p.sha256).exists())
    if p.kind == "orphan":
        return Path(p.path).exists()
    return True


def run(cfg: Config, as_json: bool = False, on_problem: ProblemHook | None = None) -> int:
    """`pacsd verify [--json]`: one line per problem and a summary; 0 clean, 1 problems."""
    open_index_db(cfg, create=False)  # verifying a node that does not exist is an error
    report = verify_all(ObjectStore.for_config(cfg), on_problem)
    if as_json:
        json.dump(report.as_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for p in report.problems:
            print(p.line())
        print(report.summary())
    return EXIT_OK if report.ok else EXIT_PROBLEM
