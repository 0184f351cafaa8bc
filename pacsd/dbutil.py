"""SQLite helpers shared by the auth and index databases: open with WAL, versioned migrations."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import peewee

from pacsd.errors import EnvironmentProblem

Migration = Callable[[peewee.SqliteDatabase], None]

PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": 2,  # FULL: a committed row survives power loss (DESIGN §5)
    "foreign_keys": 1,
    "busy_timeout": 10_000,  # ms; admin commands and workers share the files
    "cache_size": -16_000,  # 16 MB page cache per connection
    "temp_store": 2,
}


def open_sqlite(path: str | Path, *, create: bool = True) -> peewee.SqliteDatabase:
    """Open (thread-local connections) a SQLite database with our pragmas.

    Raises EnvironmentProblem when the file is missing and create is False, or unopenable.
    """
    p = Path(path)
    if not create and not p.exists():
        raise EnvironmentProblem(f"{p}: database does not exist (run `pacsd init`?)")
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not p.exists():
        fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
    db = peewee.SqliteDatabase(str(p), pragmas=PRAGMAS, check_same_thread=False)
    try:
        db.connect(reuse_if_open=True)
    except peewee.OperationalError as exc:
        raise EnvironmentProblem(f"{p}: cannot open database: {exc}") from None
    return db


def migrate(db: peewee.SqliteDatabase, migrations: Sequence[Migration]) -> int:
    """Apply the migrations not yet applied, each in its own transaction; returns the version.

    migrations[i] brings the schema from version i to version i+1. Applied versions are
    kept in the table `schema_version`, so later releases change the schema without
    losing data. Raises EnvironmentProblem if the file is newer than this code.
    """
    db.execute_sql("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    with db.atomic("IMMEDIATE"):
        row = db.execute_sql("SELECT max(version) FROM schema_version").fetchone()
        current = int(row[0] or 0)
    if current > len(migrations):
        raise EnvironmentProblem(
            f"{db.database}: schema version {current} is newer than this pacsd knows "
            f"({len(migrations)}); upgrade pacsd"
        )
    for version in range(current, len(migrations)):
        with db.atomic("IMMEDIATE"):
            row = db.execute_sql("SELECT max(version) FROM schema_version").fetchone()
            if int(row[0] or 0) > version:  # another process migrated meanwhile
                continue
            migrations[version](db)
            db.execute_sql("INSERT INTO schema_version (version) VALUES (?)", (version + 1,))
    return len(migrations)
