"""The user store: accounts, password history, known sources, shared failure counters.

Models bind to the auth database proxy (`open_auth_db`). Everything that workers change
concurrently (failure counters, locks, the last accepted TOTP step, blocked sources)
is written in short IMMEDIATE transactions or single guarded UPDATEs, never kept in
memory, so several worker processes agree.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import peewee

from pacsd.auth import lockout
from pacsd.auth.database import AuthModel, auth_db
from pacsd.auth.roles import ROLES
from pacsd.errors import AlreadyExists, NotFound, UsageError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class User(AuthModel):
    id = peewee.AutoField()
    name = peewee.TextField(unique=True)
    role = peewee.TextField()
    password_hash = peewee.TextField()
    password_set = peewee.FloatField()
    enabled = peewee.BooleanField(default=True)
    locked_until = peewee.FloatField(null=True)
    failures = peewee.IntegerField(default=0)
    failure_window_start = peewee.FloatField(null=True)
    totp_secret = peewee.BlobField(null=True)
    totp_last_step = peewee.IntegerField(null=True)
    last_login = peewee.FloatField(null=True)
    last_address = peewee.TextField(null=True)
    created = peewee.FloatField()
    updated = peewee.FloatField()

    class Meta:
        table_name = "app_user"  # "user" is reserved in PostgreSQL (DESIGN §9)

    @property
    def counters(self) -> lockout.Counters:
        return lockout.Counters(self.failures, self.failure_window_start, self.locked_until)


class PasswordHistory(AuthModel):
    id = peewee.AutoField()
    user = peewee.ForeignKeyField(User, on_delete="CASCADE", column_name="user_id")
    password_hash = peewee.TextField()
    retired = peewee.FloatField()

    class Meta:
        table_name = "user_password_history"


class UserSource(AuthModel):
    id = peewee.AutoField()
    user = peewee.ForeignKeyField(User, on_delete="CASCADE", column_name="user_id")
    address = peewee.TextField()
    first_seen = peewee.FloatField()
    last_seen = peewee.FloatField()

    class Meta:
        table_name = "user_source"


class SourceBlock(AuthModel):
    address = peewee.TextField(primary_key=True)
    failures = peewee.IntegerField(default=0)
    window_start = peewee.FloatField(null=True)
    blocked_until = peewee.FloatField(null=True)
    last_failure = peewee.FloatField()

    class Meta:
        table_name = "source_block"


@dataclass(frozen=True)
class UserInfo:
    """A snapshot of one account as `user list` and `user review` show it."""

    name: str
    role: str
    enabled: bool
    locked_until: float | None
    mfa: bool
    password_set: float
    last_login: float | None
    last_address: str | None
    created: float

    def locked(self, now: float) -> bool:
        return self.locked_until is not None and now < self.locked_until

    def expired(self, now: float, max_age_days: int) -> bool:
        return password_expired(self.password_set, now, max_age_days)

    def state(self, now: float, max_age_days: int) -> str:
        if not self.enabled:
            return "disabled"
        if self.locked(now):
            return "locked"
        if self.expired(now, max_age_days):
            return "expired"
        return "active"


def password_expired(password_set: float, now: float, max_age_days: int) -> bool:
    return max_age_days > 0 and now - password_set > max_age_days * 86_400


def _info(row: User) -> UserInfo:
    return UserInfo(
        name=row.name,
        role=row.role,
        enabled=bool(row.enabled),
        locked_until=row.locked_until,
        mfa=row.totp_secret is not None,
        password_set=row.password_set,
        last_login=row.last_login,
        last_address=row.last_address,
        created=row.created,
    )


def validate_name(name: str) -> str:
    """Raises UsageError unless `name` is 1-64 of letters, digits and . _ @ - (not first)."""
    if not _NAME_RE.match(name):
        raise UsageError(
            f"{name!r} is not a valid user name (1-64 letters, digits, '.', '_', '@', '-')"
        )
    return name


def validate_role(role: str) -> str:
    if role not in ROLES:
        raise UsageError(f"unknown role {role!r} (known: {', '.join(ROLES)})")
    return role


# --------------------------------------------------------------------------- administration


def add(name: str, role: str, password_hash: str, *, now: float | None = None) -> UserInfo:
    """Create an account; raises UsageError or AlreadyExists."""
    t = time.time() if now is None else now
    try:
        row = User.create(
            name=validate_name(name), role=validate_role(role), password_hash=password_hash,
            password_set=t, created=t, updated=t,
        )
    except peewee.IntegrityError:
        raise AlreadyExists(f"user {name!r} already exists") from None
    return _info(row)


def get(name: str) -> User | None:
    """The account row named `name`, or None."""
    return User.get_or_none(User.name == name)


def require(name: str) -> User:
    """The account row; raises NotFound."""
    row = get(name)
    if row is None:
        raise NotFound(f"user {name!r} does not exist")
    return row


def info(name: str) -> UserInfo:
    return _info(require(name))


def all_users() -> list[UserInfo]:
    return [_info(r) for r in User.select().order_by(User.name)]


def previous_hashes(row: User, history: int) -> list[str]:
    """The hashes of the last `history` passwords, the current one first."""
    if history <= 0:
        return []
    older = (
        PasswordHistory.select(PasswordHistory.password_hash)
        .where(PasswordHistory.user == row.id)
        .order_by(PasswordHistory.retired.desc(), PasswordHistory.id.desc())
        .limit(history - 1)
    )
    return [row.password_hash, *(h.password_hash for h in older)]


def set_password(name: str, password_hash: str, *, history: int,
                 now: float | None = None) -> None:
    """Replace the password, keep the old hash in the history (at most history-1 kept)."""
    t = time.time() if now is None else now
    with auth_db.atomic("IMMEDIATE"):
        row = require(name)
        if history > 1:
            PasswordHistory.create(user=row.id, password_hash=row.password_hash, retired=t)
        keep = (
            PasswordHistory.select(PasswordHistory.id)
            .where(PasswordHistory.user == row.id)
            .order_by(PasswordHistory.retired.desc(), PasswordHistory.id.desc())
            .limit(max(history - 1, 0))
        )
        PasswordHistory.delete().where(
            (PasswordHistory.user == row.id) & PasswordHistory.id.not_in(keep)
        ).execute()
        User.update(password_hash=password_hash, password_set=t, updated=t).where(
            User.id == row.id
        ).execute()


def _update(name: str, **fields: object) -> None:
    fields["updated"] = time.time()
    if User.update(**fields).where(User.name == name).execute() == 0:
        raise NotFound(f"user {name!r} does not exist")


def lock(name: str) -> None:
    """Lock until `unlock` (raises NotFound)."""
    c = lockout.locked_by_hand()
    _update(name, locked_until=c.locked_until, failures=0, failure_window_start=None)


def unlock(name: str) -> None:
    """Lift a lock and clear the failure count (raises NotFound)."""
    c = lockout.after_success()
    _update(name, locked_until=c.locked_until, failures=c.failures,
            failure_window_start=c.window_start)


def set_enabled(name: str, enabled: bool) -> None:
    _update(name, enabled=enabled)


def set_totp_secret(name: str, sealed: bytes) -> None:
    """Store a new (sealed) TOTP secret; the replay guard restarts with it."""
    _update(name, totp_secret=sealed, totp_last_step=None)


# --------------------------------------------------------------------------- login state
# Called by identity.py inside its own IMMEDIATE transaction.


def register_failure(row: User, policy: lockout.Policy, now: float) -> bool:
    """Count one failed login for the account; True when this failure locked it."""
    fresh = User.get_by_id(row.id)  # re-read inside the caller's write transaction
    c, locked_now = lockout.after_failure(now, fresh.counters, policy)
    User.update(failures=c.failures, failure_window_start=c.window_start,
                locked_until=c.locked_until).where(User.id == row.id).execute()
    return locked_now


def accept_totp_step(row: User, step: int) -> bool:
    """Record `step` as used; False when it (or a later step) was used before: a replay.

    One guarded UPDATE, so two workers can never both accept the same code.
    """
    n = (
        User.update(totp_last_step=step)
        .where((User.id == row.id)
               & (User.totp_last_step.is_null() | (User.totp_last_step < step)))
        .execute()
    )
    return bool(n == 1)


def register_success(row: User, address: str, now: float, new_hash: str | None) -> bool:
    """Reset failures, note the login and its source; True when the address is new for the user."""
    c = lockout.after_success()
    fields: dict[str, object] = {
        "failures": c.failures, "failure_window_start": c.window_start,
        "last_login": now, "last_address": address,
    }
    if new_hash is not None:
        fields["password_hash"] = new_hash  # same password, higher bcrypt cost
    User.update(**fields).where(User.id == row.id).execute()
    cur = auth_db.execute_sql(
        "INSERT INTO user_source (user_id, address, first_seen, last_seen) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (user_id, address) DO UPDATE SET last_seen = excluded.last_seen "
        "RETURNING first_seen",
        (row.id, address, now, now),
    )
    got = cur.fetchone()
    return bool(got and got[0] == now)


# --------------------------------------------------------------------------- source blocking


def source_blocked(address: str, now: float) -> bool:
    """One indexed SELECT: is `address` blocked at `now`?"""
    cur = auth_db.execute_sql(
        "SELECT 1 FROM source_block WHERE address = ? AND blocked_until > ?", (address, now)
    )
    return cur.fetchone() is not None


def register_source_failure(address: str, policy: lockout.Policy, now: float) -> bool:
    """Count one failure from `address`; True when this failure blocked it."""
    row = SourceBlock.get_or_none(SourceBlock.address == address)
    before = lockout.Counters() if row is None else lockout.Counters(
        row.failures, row.window_start, row.blocked_until)
    c, blocked_now = lockout.after_failure(now, before, policy)
    auth_db.execute_sql(
        "INSERT INTO source_block (address, failures, window_start, blocked_until, last_failure) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (address) DO UPDATE SET failures = excluded.failures, "
        "window_start = excluded.window_start, blocked_until = excluded.blocked_until, "
        "last_failure = excluded.last_failure",
        (address, c.failures, c.window_start, c.locked_until, now),
    )
    # forget addresses whose window and block are long over, so the table stays small
    auth_db.execute_sql(
        "DELETE FROM source_block WHERE last_failure < ? AND "
        "(blocked_until IS NULL OR blocked_until < ?)",
        (now - policy.window, now),
    )
    return blocked_now
