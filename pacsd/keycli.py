"""`pacsd key ...`: key versions and re-encryption of the object store (issue 7).

  key list              the key versions and how many objects each encrypts
  key rotate            a new key version; new objects (and TOTP secrets) use it from now on
  key rewrap            re-encrypt objects (and re-seal TOTP secrets) of older versions under
                        the current one; `--retire` then drops the unused old data keys
  key encrypt-existing  turn plaintext objects into envelopes (needs encryption = true)

rewrap and encrypt-existing run beside a serving node: each object is read (every GCM
tag and its SHA-256 checked), written as a new envelope to a locked temp file in
root/.tmp, fsynced and renamed over the old file, so at every instant the object is
the complete old file or the complete new one. The index's `key_version` column says
what is left to do, so a run that is stopped or killed resumes where it was; a temp
file left by a kill is swept by the next run or start. Throughput is capped by
`--rate` (MB/s) so the node keeps serving. Progress and completion are audited
(`key.rewrap`), as is every object that fails its check (`integrity.failure`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from pacsd import audit
from pacsd.config import Config
from pacsd.errors import EXIT_OK, EXIT_PROBLEM, UsageError
from pacsd.keys import FileKEK, Keyring, create_keyring
from pacsd.store.envelope import EnvelopeError
from pacsd.store.ingest import Store
from pacsd.store.objects import READ_CHUNK, ObjectStore

log = structlog.get_logger(__name__)

_PAGE = 500
_PROGRESS_EVERY = 60.0  # seconds between progress records


@dataclass
class Progress:
    done: int = 0  # objects converted
    current: int = 0  # already in the target format (index fixed only)
    bytes: int = 0
    problems: list[str] = field(default_factory=list)
    secrets: int = 0  # TOTP secrets re-sealed


def _exec(db: Any, sql: str, params: tuple[Any, ...] = ()) -> Any:
    return db.execute_sql(sql, params)


def _pending(db: Any, where: str, params: tuple[Any, ...]) -> Any:
    """Distinct digests still to do, in pages (keyset pagination: memory stays flat)."""
    last = ""
    while True:
        rows = _exec(db, f"SELECT DISTINCT sha256 FROM instance WHERE sha256 > ? AND ({where}) "  # noqa: S608
                         "ORDER BY sha256 LIMIT ?", (last, *params, _PAGE)).fetchall()
        if not rows:
            return
        for (sha,) in rows:
            yield str(sha)
        last = str(rows[-1][0])


class _Throttle:
    def __init__(self, rate_mb: float) -> None:
        self.rate = rate_mb * 1024 * 1024 if rate_mb > 0 else 0.0
        self.start = time.monotonic()
        self.bytes = 0

    def after(self, n: int) -> None:
        self.bytes += n
        if self.rate:
            ahead = self.bytes / self.rate - (time.monotonic() - self.start)
            if ahead > 0:
                time.sleep(min(ahead, 5.0))


def convert_one(store: Store, sha: str, target: int | None) -> tuple[str, int]:
    """Re-encrypt one object under the current key version unless its file is already
    at `target`; returns (outcome, bytes) with outcome 'converted' | 'current' | 'missing'.
    Raises EnvelopeError/ValueError when the object fails its check (it is left as is)."""
    objects: ObjectStore = store.objects
    path = objects.path_for(sha)
    try:
        version = objects.key_version_of(sha)
    except FileNotFoundError:
        return "missing", 0
    if target is not None and version == target:
        _set_version(store, sha, version)
        return "current", 0
    spool = objects.spool(encrypt=True)
    try:
        try:
            src = objects.open_plaintext(path)
        except FileNotFoundError:
            return "missing", 0
        with src:
            while chunk := src.read(READ_CHUNK):
                spool.write(chunk)
        if spool.finish() != sha:
            raise ValueError(f"{path}: content hashes to {spool.sha256}, not its name")
        objects.replace_with(spool)
        new_version = spool.key_version
        size = spool.size
    finally:
        spool.abort()
    if _exec(store.db, "SELECT 1 FROM instance WHERE sha256 = ? LIMIT 1", (sha,)).fetchone() \
            is None:
        objects.remove(sha)  # replaced away meanwhile: do not leave an orphan behind
        return "missing", 0
    _set_version(store, sha, new_version)
    return "converted", size


def _set_version(store: Store, sha: str, version: int | None) -> None:
    with store.db.atomic("IMMEDIATE"):
        _exec(store.db, "UPDATE instance SET key_version = ? WHERE sha256 = ?", (version, sha))


def _run(cfg: Config, *, where: str, params: tuple[Any, ...], target: int | None,
         rate_mb: float, phase: str) -> tuple[Store, Progress]:
    store = Store.open(cfg)  # loads the keyring, sweeps temp files a killed run left
    prog = Progress()
    throttle = _Throttle(rate_mb)
    last_report = time.monotonic()
    version = store.objects.keys.current_version
    audit.record(audit.Event.KEY_REWRAP, audit.Outcome.SUCCESS, phase=f"{phase}.start",
                 version=version)
    for sha in _pending(store.db, where, params):
        try:
            outcome, n = convert_one(store, sha, target)
        except (EnvelopeError, ValueError) as exc:
            prog.problems.append(f"corrupt: {store.objects.path_for(sha)}: {exc}")
            audit.record(audit.Event.INTEGRITY_FAILURE, audit.Outcome.MAJOR, sha256=sha,
                         path=str(store.objects.path_for(sha)), detail=str(exc)[:300])
            continue
        if outcome == "converted":
            prog.done += 1
            prog.bytes += n
            throttle.after(n)
        elif outcome == "current":
            prog.current += 1
        else:
            prog.problems.append(f"missing: {store.objects.path_for(sha)}")
        if time.monotonic() - last_report > _PROGRESS_EVERY:
            last_report = time.monotonic()
            audit.record(audit.Event.KEY_REWRAP, audit.Outcome.SUCCESS,
                         phase=f"{phase}.progress", objects=prog.done, bytes=prog.bytes)
            log.info("key.rewrap_progress", phase=phase, objects=prog.done, bytes=prog.bytes)
    return store, prog


def _finish(phase: str, prog: Progress, version: int) -> int:
    for line in prog.problems:
        print(line)
    print(f"{phase}: {prog.done} objects re-encrypted under key version {version} "
          f"({prog.bytes} bytes), {prog.current} already current, "
          f"{prog.secrets} TOTP secrets re-sealed, {len(prog.problems)} problems")
    audit.record(audit.Event.KEY_REWRAP,
                 audit.Outcome.SUCCESS if not prog.problems else audit.Outcome.SERIOUS,
                 phase=f"{phase}.complete", objects=prog.done, bytes=prog.bytes,
                 users_resealed=prog.secrets, problems=len(prog.problems), version=version)
    return EXIT_OK if not prog.problems else EXIT_PROBLEM


def _reseal_secrets(cfg: Config) -> int:
    """Re-seal TOTP secrets not under the current key version; returns how many."""
    from pacsd.auth import secrets
    from pacsd.auth.database import open_auth_db
    from pacsd.auth.identity import aad_for

    box = secrets.box_for(cfg)
    current = box.keyring.current_version
    db = open_auth_db(cfg)
    n = 0
    try:
        rows = _exec(db, "SELECT id, name, totp_secret FROM app_user "
                         "WHERE totp_secret IS NOT NULL").fetchall()
        for uid, name, blob in rows:
            blob = bytes(blob)
            if box.version_of(blob) == current:
                continue
            new = box.seal(box.unseal(blob, aad=aad_for(name)), aad=aad_for(name))
            with db.atomic("IMMEDIATE"):  # unchanged meanwhile (compare and swap)
                cur = _exec(db, "UPDATE app_user SET totp_secret = ? WHERE id = ? AND "
                                "totp_secret = ?", (new, uid, blob))
                n += cur.rowcount
    finally:
        db.close()
    return n


# --------------------------------------------------------------------------- commands


def run_list(cfg: Config) -> int:
    """`pacsd key list`: versions, which is current, objects per version (index)."""
    from pacsd.store.index import open_index_db

    ring = Keyring.open(cfg)
    db = open_index_db(cfg, create=False)
    counts = dict(_exec(db, "SELECT key_version, count(DISTINCT sha256) FROM instance "
                            "GROUP BY key_version").fetchall())
    print(f"keyring {ring.path} (KEK: {ring.kek.provider} {ring.kek.kek_id})")
    for v in ring.versions():
        mark = "*" if v.version == ring.current_version else " "
        print(f"{mark} version {v.version}  created {v.created}  "
              f"objects {counts.get(v.version, 0)}")
    print(f"  plaintext objects {counts.get(None, 0)}")
    return EXIT_OK


def run_rotate(cfg: Config) -> int:
    """`pacsd key rotate`: add a key version; new objects and secrets use it at once
    (running workers notice within a second). Old objects stay readable."""
    audit.start_standalone(cfg)
    kek = FileKEK.from_file(cfg.storage.key_file)
    create_keyring(cfg.storage.keyring, kek)  # audited (key.create) when it makes one
    ring = Keyring(cfg.storage.keyring, kek)
    new = ring.rotate()
    audit.record(audit.Event.KEY_ROTATE, audit.Outcome.SUCCESS, version=new, kek_id=kek.kek_id)
    print(f"key version {new} is now current; run `pacsd key rewrap` to re-encrypt older "
          "objects")
    return EXIT_OK


def run_rewrap(cfg: Config, *, rate_mb: float = 50.0, retire: bool = False) -> int:
    """`pacsd key rewrap`: re-encrypt every object and TOTP secret of an older key version
    under the current one; resumable. With `retire`, drop the data keys nothing uses."""
    audit.start_standalone(cfg)
    ring = Keyring.open(cfg)
    target = ring.current_version
    store, prog = _run(cfg, where="key_version IS NOT NULL AND key_version <> ?",
                       params=(target,), target=target, rate_mb=rate_mb, phase="rewrap")
    try:
        prog.secrets = _reseal_secrets(cfg)
        if retire and not prog.problems:
            used = _versions_in_use(store)
            dropped = store.objects.keys.retire(used)
            if dropped:
                print(f"retired key versions {', '.join(map(str, dropped))}")
                audit.record(audit.Event.KEY_ROTATE, audit.Outcome.SUCCESS,
                             phase="retire", retired=dropped, version=target)
        elif retire:
            print("not retiring old key versions: some objects could not be re-encrypted")
    finally:
        store.close()
    return _finish("rewrap", prog, target)


def _versions_in_use(store: Store) -> set[int]:
    """Key versions found in any object file's header (not only the index) or secret."""
    used: set[int] = set()
    for _path, sha in store.objects.walk():
        if sha is not None:
            try:
                v = store.objects.key_version_of(sha)
            except (FileNotFoundError, EnvelopeError):
                continue
            if v is not None:
                used.add(v)
    return used


def run_encrypt_existing(cfg: Config, *, rate_mb: float = 50.0) -> int:
    """`pacsd key encrypt-existing`: convert plaintext objects to envelopes in place."""
    if not cfg.storage.encryption:
        raise UsageError("storage.encryption: set it to true (and reload the node) before "
                         "`pacsd key encrypt-existing`, so new objects are encrypted too")
    audit.start_standalone(cfg)
    store, prog = _run(cfg, where="key_version IS NULL", params=(), target=None,
                       rate_mb=rate_mb, phase="encrypt-existing")
    version = store.objects.keys.current_version
    store.close()
    return _finish("encrypt-existing", prog, version)
