"""Gate 4 (DESIGN §4): verify the user identity an association offers; gate 1's block list.

`verify_identity` returns an IdentityDecision and never raises for anything a peer
sent. Every refusal looks the same to the peer; `reason` is for the audit record.
Unknown user, wrong password, locked, disabled and expired accounts cost the same:
exactly one bcrypt of the configured cost (a dummy hash when there is no account),
the account's state is looked at only after the hash, and each failure path commits
exactly one short write transaction (every refused attempt counts against its source
address; only a wrong password or code on a usable account counts towards its lockout).
An account whose stored hash has a lower cost than configured is faster until its
next successful login rehashes it.

The process must have opened the auth database (`open_auth_db`) first; if it has
not, the first call opens it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import peewee
import structlog

from pacsd.auth import lockout, passwords, totp, users
from pacsd.auth import secrets as sealed
from pacsd.auth.database import auth_db, open_auth_db
from pacsd.config import Config
from pacsd.errors import EnvironmentProblem

log = structlog.get_logger(__name__)

# PS3.7 D.3.3.7.1 User-Identity-Type
USERNAME = 1
USERNAME_PASSCODE = 2
KERBEROS = 3
SAML = 4
JWT = 5

MAX_FIELD = 1024  # bytes; longer primary/secondary fields are refused before any work


@dataclass(frozen=True)
class IdentityDecision:
    """The outcome of gate 4. `username`/`role` are set only for an existing account."""

    ok: bool
    username: str | None
    role: str | None
    reason: str
    locked_now: bool = False
    new_source: bool = False
    source_blocked_now: bool = False


def _ensure_db(cfg: Config) -> None:
    if auth_db.obj is None:
        open_auth_db(cfg)


def source_blocked(cfg: Config, ip: str, *, now: float | None = None) -> bool:
    """True when new connections from `ip` are to be closed at accept (one indexed SELECT)."""
    _ensure_db(cfg)
    return users.source_blocked(ip, time.time() if now is None else now)


def aad_for(name: str) -> bytes:
    """Associated data that binds a sealed TOTP secret to its account."""
    return b"pacsd totp secret\0" + name.encode("utf-8")


def verify_identity(
    cfg: Config,
    *,
    user_type: int,
    primary: bytes,
    secondary: bytes,
    source_ip: str,
    require_user: bool,
    now: float | None = None,
) -> IdentityDecision:
    """Decide on a User Identity item; `now` is for tests. Never raises on peer data."""
    if user_type == USERNAME:
        if require_user:
            return IdentityDecision(False, None, None, "password_required")
        # an unverified name grants nothing: the association goes on as if no user were given
        return IdentityDecision(True, None, None, "username_unverified")
    if user_type != USERNAME_PASSCODE:
        return IdentityDecision(False, None, None, "unsupported_type")
    if not primary or len(primary) > MAX_FIELD or len(secondary) > MAX_FIELD:
        return IdentityDecision(False, None, None, "malformed")
    _ensure_db(cfg)
    t = time.time() if now is None else now
    if users.source_blocked(source_ip, t):
        return IdentityDecision(False, None, None, "source_blocked")
    try:
        return _verify_passcode(cfg, primary.decode("utf-8", "surrogateescape"),
                                secondary.decode("utf-8", "surrogateescape"), source_ip, t)
    except peewee.DatabaseError as exc:  # e.g. the database stayed locked past busy_timeout
        log.error("identity_database_error", error=str(exc))
        return IdentityDecision(False, None, None, "internal_error")


def _verify_passcode(
    cfg: Config, name: str, passcode: str, ip: str, now: float
) -> IdentityDecision:
    rounds = cfg.auth.password.bcrypt_rounds
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # not UTF-8 on the wire: no account can have this name
        row = None
    else:
        row = users.get(name)
    if row is None:
        passwords.dummy_verify(passcode, rounds)
        return _fail(cfg, None, "unknown_user", ip, now, count_account=False)

    has_totp = row.totp_secret is not None
    code = ""
    password = passcode
    if has_totp:
        password, code = passcode[: -totp.DIGITS], passcode[-totp.DIGITS:]
    password_ok = passwords.verify_password(password, row.password_hash)

    # the account's state only now, after the hash, so every path above cost the same
    locked = lockout.is_locked(now, row.counters)
    if not row.enabled:
        return _fail(cfg, row, "disabled", ip, now, count_account=False)
    if locked:
        return _fail(cfg, row, "locked", ip, now, count_account=False)
    if not password_ok:
        return _fail(cfg, row, "bad_password", ip, now, count_account=True)
    if users.password_expired(row.password_set, now, cfg.auth.password.max_age_days):
        return _fail(cfg, row, "expired", ip, now, count_account=False)

    step: int | None = None
    if row.totp_secret is not None:
        try:
            secret = sealed.box_for(cfg).unseal(row.totp_secret, aad=aad_for(row.name))
        except EnvironmentProblem as exc:
            log.error("totp_secret_unavailable", user=row.name, error=str(exc))
            return IdentityDecision(False, row.name, row.role, "totp_unavailable")
        step = totp.match_step(secret.decode("ascii"), code, now=now,
                               valid_window=cfg.auth.totp.valid_window)
        if step is None:
            return _fail(cfg, row, "bad_totp", ip, now, count_account=True)

    new_hash = None
    if passwords.needs_rehash(row.password_hash, rounds):  # bcrypt outside the write lock
        new_hash = passwords.hash_password(password, rounds)
    new_source = False
    with auth_db.atomic("IMMEDIATE"):
        replay = step is not None and not users.accept_totp_step(row, step)
        if not replay:
            new_source = users.register_success(row, ip, now, new_hash)
    if replay:
        return _fail(cfg, row, "totp_replay", ip, now, count_account=True)
    return IdentityDecision(True, row.name, row.role, "ok", new_source=new_source)


def _fail(cfg: Config, row: users.User | None, reason: str, ip: str, now: float, *,
          count_account: bool) -> IdentityDecision:
    """Count the failure against the source (every refused attempt) and, for a wrong password
    or code on a usable account, against the account; one write transaction on every path."""
    locked_now = False
    with auth_db.atomic("IMMEDIATE"):
        blocked_now = users.register_source_failure(
            ip, lockout.Policy.for_sources(cfg.auth), now)
        if row is not None and count_account:
            locked_now = users.register_failure(row, lockout.Policy.for_accounts(cfg.auth), now)
    return IdentityDecision(
        False,
        row.name if row is not None else None,
        row.role if row is not None else None,
        reason,
        locked_now=locked_now,
        source_blocked_now=blocked_now,
    )
