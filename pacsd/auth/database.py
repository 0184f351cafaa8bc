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


def _m2_users(db: peewee.SqliteDatabase) -> None:
    # Times are seconds since the epoch (REAL): lockout arithmetic compares them directly.
    db.execute_sql(
        """CREATE TABLE app_user (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            role TEXT NOT NULL,
            password_hash TEXT NOT NULL,
            password_set REAL NOT NULL,
            enabled INTEGER NOT NULL DEFAULT 1,
            locked_until REAL,
            failures INTEGER NOT NULL DEFAULT 0,
            failure_window_start REAL,
            totp_secret BLOB,
            totp_last_step INTEGER,
            last_login REAL,
            last_address TEXT,
            created REAL NOT NULL,
            updated REAL NOT NULL
        )"""
    )
    db.execute_sql(
        """CREATE TABLE user_password_history (
            id INTEGER PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES app_user (id) ON DELETE CASCADE,
            password_hash TEXT NOT NULL,
            retired REAL NOT NULL
        )"""
    )
    db.execute_sql("CREATE INDEX user_password_history_user ON user_password_history (user_id)")
    db.execute_sql(
        """CREATE TABLE user_source (
            id INTEGER PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES app_user (id) ON DELETE CASCADE,
            address TEXT NOT NULL,
            first_seen REAL NOT NULL,
            last_seen REAL NOT NULL,
            UNIQUE (user_id, address)
        )"""
    )
    db.execute_sql(
        """CREATE TABLE source_block (
            address TEXT PRIMARY KEY,
            failures INTEGER NOT NULL DEFAULT 0,
            window_start REAL,
            blocked_until REAL,
            last_failure REAL NOT NULL
        ) WITHOUT ROWID"""
    )


# Append only. Index i migrates schema version i -> i+1.
MIGRATIONS: list[dbutil.Migration] = [_m1_peers, _m2_users]


def open_auth_db(cfg: Config) -> peewee.SqliteDatabase:
    """Open (creating and migrating as needed) the auth database and bind the models to it."""
    db = dbutil.open_sqlite(cfg.auth.database)
    dbutil.migrate(db, MIGRATIONS)
    auth_db.initialize(db)
    return db
