"""`pacsd backup DEST` and `pacsd restore SRC`: a consistent, verifiable copy of the node.

A backup directory holds:
  index.sqlite, users.sqlite   SQLite online-backup snapshots (taken while the node serves;
                               WAL lets writers go on), each passed `PRAGMA quick_check`
  objects/ab/cd/<sha256>.dcm   every object the index snapshot references: hard-linked when
                               DEST is on the same file system (objects are immutable and
                               content-addressed), else copied and fsynced
  keyring.json                 `[storage] keyring` (wrapped data keys), when there is one;
                               copied last, so it holds every key version the objects use
                               (do not run `pacsd key rewrap --retire` during a backup)
  backup.json                  what was backed up: counts, bytes, time, node, format
  manifest.sha256              SHA-256 of every file above, in `sha256sum -c` format;
                               written last, so a backup without it is incomplete

The index is snapshotted first and objects are taken from that snapshot, so objects
stored later are simply not in this backup, and nothing the snapshot references is
missing. Every plaintext object is hashed while it is backed up: one that no longer
matches its name is reported (exit 1) and left out, so corruption is not carried over.

`restore` checks the manifest against SRC before writing anything, refuses when the
databases or object root named by --config hold data (or a node is serving on them),
copies everything into place (temp name, fsync, rename; objects are copied, never
linked back to the backup, so damage to one copy cannot reach the other), then hashes
what it wrote against the manifest again before it says done.

The TLS keys and the storage key (tls/storage.key, which also wraps TOTP secrets) are
not part of a backup: keep them with the configuration, apart from the data.

`backup --encrypt` (issue 7) writes the two databases and every plaintext object as
AES-256-GCM envelopes (`store.envelope`) under the current key version; objects that are
already envelopes are taken as they are. The database snapshots are taken beside the live
databases (never in plaintext on the backup's disk) and sealed from there. The manifest
lists the bytes as written; `restore` checks them, then needs the storage key to open
the databases, and says so in one line when it is missing or not the right one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pacsd import __version__, audit
from pacsd.config import Config
from pacsd.errors import (
    EXIT_OK,
    EXIT_PROBLEM,
    AlreadyExists,
    EnvironmentProblem,
    PacsdError,
    ProblemFound,
    UsageError,
)
from pacsd.store.envelope import EnvelopeError, is_envelope_file, open_file, seal_file
from pacsd.store.objects import READ_CHUNK, is_sha256

MANIFEST = "manifest.sha256"
INFO = "backup.json"
INDEX = "index.sqlite"
USERS = "users.sqlite"
KEYRING = "keyring.json"
OBJECTS = "objects"
FORMAT = 1

# the only names a manifest may hold: a tampered manifest cannot steer a write elsewhere
_MANIFEST_LINE = re.compile(
    r"^([0-9a-f]{64})  (index\.sqlite|users\.sqlite|backup\.json|keyring\.json|"
    r"objects/([0-9a-f]{2})/([0-9a-f]{2})/([0-9a-f]{64})\.dcm)$")


# --------------------------------------------------------------------------- helpers


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(READ_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(view):
            h.update(view[:n])
    return h.hexdigest()


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_hashing(src: Path, dst: Path) -> str:
    """Copy src to dst (created 0600, fsynced); returns the SHA-256 of the bytes copied."""
    h = hashlib.sha256()
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with open(src, "rb", buffering=0) as f:
            buf = bytearray(READ_CHUNK)
            view = memoryview(buf)
            while n := f.readinto(view):
                h.update(view[:n])
                _write_all(fd, view[:n])
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        dst.unlink(missing_ok=True)
        raise
    os.close(fd)
    return h.hexdigest()


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _object_rel(sha: str) -> str:
    return f"{OBJECTS}/{sha[0:2]}/{sha[2:4]}/{sha}.dcm"


def key_id(cfg: Config) -> str:
    """A non-secret identifier of the storage key (to tell whether two nodes share it)."""
    try:
        data = Path(cfg.storage.key_file).read_bytes()
    except OSError:
        return ""
    return hashlib.sha256(b"pacsd storage key id\0" + data).hexdigest()[:16]


def sqlite_snapshot(src: str, dst: Path) -> None:
    """SQLite online backup of `src` into the new file `dst` (one step: one consistent
    read transaction; WAL writers continue meanwhile), then `quick_check` on the copy.

    Raises EnvironmentProblem naming the database.
    """
    if not Path(src).is_file():
        raise EnvironmentProblem(f"{src}: database not found")
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    try:
        source = sqlite3.connect(src, timeout=30)
        try:
            target = sqlite3.connect(dst)
            try:
                source.backup(target)  # pages=-1: everything in one step
                ok = target.execute("PRAGMA quick_check").fetchone()[0]
                target.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            finally:
                target.close()
        finally:
            source.close()
    except sqlite3.Error as exc:
        raise EnvironmentProblem(f"{src}: online backup failed: {exc}") from None
    if ok != "ok":
        raise EnvironmentProblem(f"{src}: the snapshot fails quick_check: {ok}")
    _fsync_path(dst)


# --------------------------------------------------------------------------- backup


@dataclass
class BackupReport:
    instances: int = 0
    files: int = 0  # object files
    bytes: int = 0
    linked: int = 0
    copied: int = 0
    problems: list[str] = field(default_factory=list)


def _prepare_dest(dest: Path) -> None:
    if dest.exists():
        if not dest.is_dir():
            raise AlreadyExists(f"{dest} exists and is not a directory")
        if any(dest.iterdir()):
            raise AlreadyExists(f"{dest} is not empty; back up into a new or empty directory")
    else:
        dest.mkdir(mode=0o700, parents=True)
    dest.chmod(0o700)


def _referenced(index_copy: Path) -> Iterator[tuple[str, bool]]:
    """(sha256, plaintext) for every object the snapshot's instance rows reference."""
    con = sqlite3.connect(f"file:{index_copy}?mode=ro", uri=True)
    try:
        yield from ((str(sha), kv is None) for sha, kv in con.execute(
            "SELECT sha256, min(key_version) FROM instance GROUP BY sha256 ORDER BY sha256"))
    finally:
        con.close()


def _count_instances(index_copy: Path) -> int:
    con = sqlite3.connect(f"file:{index_copy}?mode=ro", uri=True)
    try:
        return int(con.execute("SELECT count(*) FROM instance").fetchone()[0])
    finally:
        con.close()


def _mark_sealed(index_copy: Path, shas: list[str], version: int) -> None:
    con = sqlite3.connect(index_copy)
    try:
        with con:
            con.executemany("UPDATE instance SET key_version = ? WHERE sha256 = ?",
                            [(version, sha) for sha in shas])
    finally:
        con.close()


def _seal_key(cfg: Config) -> tuple[int, bytes]:
    from pacsd.keys import Keyring

    return Keyring.open(cfg, create=True).current()


def backup(cfg: Config, dest: Path, *, encrypt: bool = False) -> BackupReport:
    """Write a complete backup of the node named by cfg into `dest` (new or empty).

    Raises AlreadyExists (dest not empty), EnvironmentProblem (a database or file
    cannot be read or written). Problems with single objects are in the report.
    """
    dest = dest.resolve()
    root = Path(cfg.storage.root).resolve()
    if dest == root or root in dest.parents:
        raise UsageError(f"{dest}: the backup cannot live inside the object root {root}")
    _prepare_dest(dest)
    report = BackupReport()
    manifest: dict[str, str] = {}
    started = time.time()
    seal = _seal_key(cfg) if encrypt else None
    snap = dest
    if seal is not None:  # plaintext snapshots stay beside the live databases
        snap = Path(cfg.storage.index).parent / f".backup-{os.getpid()}-{int(started)}"
        snap.mkdir(mode=0o700)
    try:
        sqlite_snapshot(cfg.storage.index, snap / INDEX)
        sqlite_snapshot(cfg.auth.database, snap / USERS)
        if seal is None:
            for name in (INDEX, USERS):
                manifest[name] = _sha256_file(dest / name)
        report.instances = _count_instances(snap / INDEX)
        sealed: list[str] = []
        made: set[Path] = set()
        for sha, plaintext in _referenced(snap / INDEX):
            if not is_sha256(sha):
                report.problems.append(f"index row holds an invalid sha256 {sha[:80]!r}")
                continue
            rel = _object_rel(sha)
            src = root / rel[len(OBJECTS) + 1:]
            dst = dest / rel
            if dst.parent not in made:
                dst.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                made.add(dst.parent)
            try:
                if seal is not None and plaintext:
                    digest, actual = seal_file(src, dst, *seal)
                    linked = False
                    sealed.append(sha)
                else:
                    digest, linked = _take_object(src, dst)
                    actual = digest
            except FileNotFoundError:
                report.problems.append(f"missing: {src} (referenced by the index)")
                continue
            if plaintext and actual != sha:
                dst.unlink()
                report.problems.append(f"corrupt: {src} hashes to {actual}; left out")
                continue
            manifest[rel] = digest
            report.files += 1
            report.bytes += dst.stat().st_size
            report.linked += linked
            report.copied += not linked
        for d in sorted(made, reverse=True):
            _fsync_path(d, directory=True)
            _fsync_path(d.parent, directory=True)
        if seal is not None:  # the snapshot's index says which objects are now envelopes
            _mark_sealed(snap / INDEX, sealed, seal[0])
            for name in (INDEX, USERS):
                manifest[name] = seal_file(snap / name, dest / name, *seal)[0]
        keyring = Path(cfg.storage.keyring)
        if keyring.is_file():
            manifest[KEYRING] = _copy_hashing(keyring, dest / KEYRING)
        info = {
            "format": FORMAT,
            "pacsd": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "seconds": round(time.time() - started, 3),
            "ae_title": cfg.node.ae_title,
            "config": cfg.source,
            "instances": report.instances,
            "objects": report.files,
            "bytes": report.bytes,
            "storage_key_id": key_id(cfg),
            "encrypted": seal is not None,
            "problems": report.problems,
        }
        (dest / INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        _fsync_path(dest / INFO)
        manifest[INFO] = _sha256_file(dest / INFO)
        _write_manifest(dest, manifest)
    except BaseException:
        # an incomplete backup has no manifest, so it can never be restored by mistake
        with contextlib.suppress(OSError):
            (dest / MANIFEST).unlink(missing_ok=True)
        raise
    finally:
        if snap != dest:
            for name in (INDEX, USERS):
                (snap / name).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                snap.rmdir()
    return report


def _take_object(src: Path, dst: Path) -> tuple[str, bool]:
    """Hard-link (else copy) one object; returns (sha256 of its bytes, linked)."""
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise FileNotFoundError(str(src)) from None
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES,
                             errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        return _copy_hashing(src, dst), False
    return _sha256_file(dst), True


def _write_manifest(dest: Path, manifest: dict[str, str]) -> None:
    tmp = dest / f".{MANIFEST}.tmp"
    lines = "".join(f"{digest}  {name}\n" for name, digest in sorted(manifest.items()))
    tmp.write_text(lines, encoding="ascii")
    _fsync_path(tmp)
    tmp.replace(dest / MANIFEST)
    _fsync_path(dest, directory=True)


def run_backup(cfg: Config, dest: Path, *, encrypt: bool = False) -> int:
    """`pacsd backup DEST`: 0 when complete and clean, 1 when an object was missing or
    corrupt (the rest is backed up and listed). Raises AlreadyExists, EnvironmentProblem."""
    audit.start_standalone(cfg)
    old_umask = os.umask(0o077)  # a backup holds patient data: owner only
    try:
        report = backup(cfg, dest, encrypt=encrypt)
    except PacsdError as exc:
        audit.record(audit.Event("store.backup"), audit.Outcome.SERIOUS, dest=str(dest),
                     error=str(exc)[:500])
        raise
    finally:
        os.umask(old_umask)
    for line in report.problems:
        print(line)
    print(f"backup complete: {report.instances} instances, {report.files} objects "
          f"({report.bytes} bytes; {report.linked} hard-linked, {report.copied} copied), "
          f"2 databases -> {dest.resolve()}; manifest {MANIFEST}")
    audit.record(audit.Event("store.backup"),
                 audit.Outcome.SUCCESS if not report.problems else audit.Outcome.SERIOUS,
                 dest=str(dest.resolve()), instances=report.instances, files=report.files,
                 bytes=report.bytes, linked=report.linked, copied=report.copied,
                 problems=len(report.problems), encrypted=encrypt)
    return EXIT_OK if not report.problems else EXIT_PROBLEM


# --------------------------------------------------------------------------- restore


def read_manifest(src: Path) -> dict[str, str]:
    """{relative name: sha256} from SRC/manifest.sha256; raises ProblemFound when it is
    missing or holds a line that is not one of ours."""
    try:
        text = (src / MANIFEST).read_text(encoding="ascii")
    except FileNotFoundError:
        raise ProblemFound(f"{src}: no {MANIFEST}; not a complete pacsd backup") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProblemFound(f"{src / MANIFEST}: cannot read: {exc}") from None
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        m = _MANIFEST_LINE.match(line)
        if not m or (m.group(5) and m.group(5)[:4] != m.group(3) + m.group(4)):
            raise ProblemFound(f"{src / MANIFEST}: line {n} is not a pacsd manifest entry")
        out[m.group(2)] = m.group(1)
    for required in (INDEX, USERS, INFO):
        if required not in out:
            raise ProblemFound(f"{src / MANIFEST}: {required} is not listed")
    return out


def verify_against(base: Path, manifest: dict[str, str], names: Any = None) -> list[str]:
    """Problems found hashing files under `base` against the manifest (empty: all good)."""
    problems = []
    for name in sorted(names if names is not None else manifest):
        p = base / name
        try:
            digest = _sha256_file(p)
        except FileNotFoundError:
            problems.append(f"missing: {p}")
            continue
        if digest != manifest[name]:
            problems.append(f"altered: {p} hashes to {digest}, the manifest says "
                            f"{manifest[name]}")
    return problems


def _has_rows(db: str) -> str | None:
    """The first table holding rows in the SQLite file `db`, or None (absent/empty)."""
    p = Path(db)
    if not p.exists() or p.stat().st_size == 0:
        return None
    try:
        con = sqlite3.connect(f"file:{p}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error as exc:
        raise EnvironmentProblem(f"{p}: cannot open: {exc}") from None
    try:
        tables = [str(r[0]) for r in con.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
        for t in tables:
            if t == "schema_version":
                continue
            if con.execute(f'SELECT 1 FROM "{t}" LIMIT 1').fetchone():  # noqa: S608 - name from sqlite_master
                return t
    except sqlite3.Error as exc:
        raise EnvironmentProblem(f"{p}: cannot read: {exc}") from None
    finally:
        con.close()
    return None


def _check_empty(cfg: Config, serving: bool = False, *, keyring: bool = True) -> None:
    """Refuse (AlreadyExists) unless the configured databases and object root hold no data."""
    from pacsd.audit import socket_live, socket_path_for

    if serving or socket_live(socket_path_for(cfg)):
        raise EnvironmentProblem(f"{cfg.source}: a node is serving with this configuration; "
                                 "stop it before restoring")
    if keyring and Path(cfg.storage.keyring).exists():
        raise AlreadyExists(f"storage.keyring: {cfg.storage.keyring} exists; restore brings "
                            "the backed-up node's keyring (remove this one first)")
    for key, db in (("storage.index", cfg.storage.index), ("auth.database", cfg.auth.database)):
        table = _has_rows(db)
        if table is not None:
            raise AlreadyExists(f"{key}: {db} holds data (table {table}); restore needs "
                                "empty locations")
    root = Path(cfg.storage.root)
    if root.exists():
        for dirpath, _dirnames, filenames in os.walk(root):
            if filenames:
                raise AlreadyExists(f"storage.root: {root} is not empty "
                                    f"({Path(dirpath) / filenames[0]}); restore needs "
                                    "empty locations")


def _place_db(src: Path, target: Path, deks: Any = None) -> str:
    """Copy (or, from an encrypted backup, decrypt) a database into place; returns the
    SHA-256 of what was placed."""
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.restore-tmp")
    tmp.unlink(missing_ok=True)
    if deks is not None and is_envelope_file(src):
        try:
            digest = open_file(src, tmp, deks)
        except EnvelopeError as exc:
            raise ProblemFound(f"{src}: {exc}") from None
    else:
        digest = _copy_hashing(src, tmp)
    for suffix in ("-wal", "-shm", "-journal"):  # stale companions of an empty database
        Path(str(target) + suffix).unlink(missing_ok=True)
    tmp.replace(target)
    _fsync_path(target.parent, directory=True)
    return digest


def _backup_keys(cfg: Config, src: Path, manifest: dict[str, str]) -> Any:
    """The data keys of an encrypted backup (its keyring under our key file), or None
    for a plaintext one. Raises KeyProblem in one line when the key cannot open it."""
    if not any(is_envelope_file(src / n) for n in (INDEX, USERS)):
        return None
    from pacsd.keys import FileKEK, KeyProblem, Keyring

    if KEYRING not in manifest:
        raise KeyProblem(f"{src}: an encrypted backup without its {KEYRING}")
    try:
        return Keyring(src / KEYRING, FileKEK.from_file(cfg.storage.key_file)).dek
    except KeyProblem as exc:
        raise KeyProblem(f"{src} is an encrypted backup and the storage key cannot open it: "
                         f"{exc}") from None


def restore(cfg: Config, src: Path, *, serving: bool = False) -> tuple[int, int, int]:
    """Restore SRC into the locations named by cfg; returns (instances, files, bytes).

    Raises ProblemFound (the backup is incomplete or damaged: nothing was written, or
    what was written does not verify), AlreadyExists (targets hold data),
    EnvironmentProblem.
    """
    src = src.resolve()
    manifest = read_manifest(src)
    damaged = verify_against(src, manifest)
    if damaged:
        raise ProblemFound(f"{src}: the backup does not match its manifest; nothing restored: "
                           + "; ".join(damaged[:5])
                           + (f" (and {len(damaged) - 5} more)" if len(damaged) > 5 else ""))
    deks = _backup_keys(cfg, src, manifest)  # before anything is written
    if KEYRING in manifest:
        _check_empty(cfg, serving)
    else:
        _check_empty(cfg, serving, keyring=False)
    root = Path(cfg.storage.root)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    (root / ".tmp").mkdir(mode=0o700, exist_ok=True)
    objects = sorted(n for n in manifest if n.startswith(OBJECTS + "/"))
    made: set[Path] = set()
    total = 0
    for name in objects:
        dst = root / name[len(OBJECTS) + 1:]
        if dst.parent not in made:
            dst.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            made.add(dst.parent)
        tmp = root / ".tmp" / f"restore-{dst.name}"
        tmp.unlink(missing_ok=True)
        _copy_hashing(src / name, tmp)
        tmp.replace(dst)
        total += dst.stat().st_size
    for d in sorted(made, reverse=True):
        _fsync_path(d, directory=True)
        _fsync_path(d.parent, directory=True)
    placed_dbs = {INDEX: _place_db(src / INDEX, Path(cfg.storage.index), deks),
                  USERS: _place_db(src / USERS, Path(cfg.auth.database), deks)}
    if KEYRING in manifest:
        _place_db(src / KEYRING, Path(cfg.storage.keyring))  # same careful copy
    # what is now in place, read back, must be what was backed up
    placed = {name: manifest[name] for name in objects}
    check = verify_against(root, {n[len(OBJECTS) + 1:]: d for n, d in placed.items()})
    for name, target in ((INDEX, cfg.storage.index), (USERS, cfg.auth.database),
                         (KEYRING, cfg.storage.keyring)):
        expected = placed_dbs.get(name, manifest.get(name)) if deks is not None else \
            manifest.get(name)
        if name in manifest and _sha256_file(Path(target)) != expected:
            check.append(f"altered: {target} differs from the backup's {name}")
    if check:
        raise ProblemFound("restored files do not verify: " + "; ".join(check[:5]))
    info = json.loads((src / INFO).read_text(encoding="utf-8"))
    if info.get("storage_key_id") and info["storage_key_id"] != key_id(cfg):
        print(f"warning: {cfg.storage.key_file} is not the storage key of the backed-up node; "
              "copy that key into place before serving, or TOTP secrets cannot be read")
    return int(info.get("instances", 0)), len(objects), total


def run_restore(cfg: Config, src: Path) -> int:
    """`pacsd restore SRC`: 0 once everything is in place and verified."""
    # a sequencer answering means a node serves on these databases
    serving = isinstance(audit.start_standalone(cfg), audit.WorkerClient)
    old_umask = os.umask(0o077)
    try:
        instances, files, nbytes = restore(cfg, src, serving=serving)
    except PacsdError as exc:
        audit.record(audit.Event("store.restore"), audit.Outcome.SERIOUS, src=str(src),
                     error=str(exc)[:500])
        raise
    finally:
        os.umask(old_umask)
    audit.record(audit.Event("store.restore"), audit.Outcome.SUCCESS, src=str(src.resolve()),
                 instances=instances, files=files, bytes=nbytes)
    print(f"restore complete: {instances} instances, {files} objects ({nbytes} bytes) and 2 "
          f"databases verified against {src.resolve() / MANIFEST}")
    return EXIT_OK
