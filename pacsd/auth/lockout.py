"""Lockout arithmetic: pure functions over (now, counters, policy); no I/O, no clock.

The same arithmetic serves accounts ([auth] lockout_*) and source addresses
([auth] source_block_*): `threshold` consecutive failures inside `window` seconds
(counted from the first failure of the run) lock for `duration` seconds. A success
resets the run. The callers keep the counters in SQLite, so every worker process
sees the same state; these functions only compute the next state.
"""

from __future__ import annotations

from dataclasses import dataclass

from pacsd.config import AuthConfig

# A lock "until `pacsd user unlock`": 9999-12-31T23:59:59Z, far enough and still a real date.
FOREVER = 253_402_300_799.0


@dataclass(frozen=True)
class Counters:
    """Failure state of one account or one source address."""

    failures: int = 0
    window_start: float | None = None
    locked_until: float | None = None


@dataclass(frozen=True)
class Policy:
    """threshold failures within window seconds lock for duration seconds.

    duration 0 means "until unlocked by hand" when zero_is_forever, else "never lock"
    (per-source blocking has no manual unblock, so 0 there turns it off).
    """

    threshold: int
    window: float
    duration: float
    zero_is_forever: bool = True

    @classmethod
    def for_accounts(cls, auth: AuthConfig) -> Policy:
        return cls(auth.lockout_threshold, auth.lockout_window, auth.lockout_duration, True)

    @classmethod
    def for_sources(cls, auth: AuthConfig) -> Policy:
        # There is no separate source window key: the account window is used for both.
        return cls(auth.source_block_threshold, auth.lockout_window,
                   auth.source_block_duration, False)


def is_locked(now: float, c: Counters) -> bool:
    """True while a lock is in force at `now`."""
    return c.locked_until is not None and now < c.locked_until


def after_failure(now: float, c: Counters, p: Policy) -> tuple[Counters, bool]:
    """The counters after one more failure at `now`, and whether this failure locked.

    A failure while already locked changes nothing (a lock is never extended by the
    attacker's own retries, so it cannot be prolonged indefinitely).
    """
    if is_locked(now, c):
        return c, False
    if p.duration == 0 and not p.zero_is_forever:
        return Counters(), False
    if c.window_start is None or c.failures == 0 or now - c.window_start > p.window \
            or now < c.window_start:
        failures, start = 1, now
    else:
        failures, start = c.failures + 1, c.window_start
    if failures >= p.threshold:
        until = FOREVER if p.duration == 0 else now + p.duration
        return Counters(0, None, until), True
    return Counters(failures, start, None), False


def after_success() -> Counters:
    """A success resets the run of failures."""
    return Counters()


def locked_by_hand() -> Counters:
    """The counters of `pacsd user lock`: locked until unlocked."""
    return Counters(0, None, FOREVER)
