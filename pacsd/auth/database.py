"""The auth database ([auth] database): peers, users and shared lockout state.

Models bind to `auth_db`, a proxy initialised once per process by `open_auth_db`.
The schema is versioned: append a function to MIGRATIONS, never edit an applied one.
"""

from __future__ import annotations

import peewee

from pacsd import dbutil
from pacsd.config import Config

auth_db = peewee.DatabaseProxy()


class AuthModel(peewee.Model):
    class Meta:
        database = auth_db


def _m1_peers(db: peewee.SqliteDatabase) -> None:
    db.execute_sql(
        """CREATE TABLE peer_ae (
            id INTEGER PRIMARY KEY,
            title TEXT NOT NULL UNIQUE,
            cert_sha256 TEXT NOT NULL,
            cert_subject TEXT NOT NULL DEFAULT '',
            cert_not_after TEXT NOT NULL DEFAULT '',
            hosts TEXT NOT NULL DEFAULT '[]',
            permits TEXT NOT NULL DEFAULT '[]',
            require_user INTEGER NOT NULL DEFAULT 0,
            dest TEXT NOT NULL DEFAULT '',
            move_to TEXT NOT NULL DEFAULT '[]',
            enabled INTEGER NOT NULL DEFAULT 1,
            created TEXT NOT NULL,
            updated TEXT NOT NULL
        )"""
    )
    db.execute_sql(
        """CREATE TABLE peer_source (
            id INTEGER PRIMARY KEY,
            title TEXT NOT NULL,
            address TEXT NOT NULL,
            first_seen TEXT NOT NULL,
            last_seen TEXT NOT NULL,
            UNIQUE (title, address)
        )"""
    )


# Append only. Index i migrates schema version i -> i+1.
MIGRATIONS: list[dbutil.Migration] = [_m1_peers]


def open_auth_db(cfg: Config) -> peewee.SqliteDatabase:
    """Open (creating and migrating as needed) the auth database and bind the models to it."""
    db = dbutil.open_sqlite(cfg.auth.database)
    dbutil.migrate(db, MIGRATIONS)
    auth_db.initialize(db)
    return db
