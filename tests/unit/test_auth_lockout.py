"""Lockout arithmetic (pacsd.auth.lockout): pure functions, no clock, no database."""

from __future__ import annotations

from pacsd.auth import lockout
from pacsd.auth.lockout import FOREVER, Counters, Policy, after_failure, after_success, is_locked
from pacsd.config import AuthConfig

P = Policy(threshold=3, window=60, duration=300)


def fail_n(
    n: int, start: float = 1000.0, step: float = 1.0, p: Policy = P
) -> list[tuple[Counters, bool]]:
    c, out = Counters(), []
    for i in range(n):
        c, locked = after_failure(start + i * step, c, p)
        out.append((c, locked))
    return out


def test_threshold_failures_within_window_lock_for_duration() -> None:
    steps = fail_n(3)
    assert [locked for _, locked in steps] == [False, False, True]
    c = steps[-1][0]
    assert c.locked_until == 1002.0 + 300
    assert is_locked(1002.0 + 299, c)
    assert not is_locked(1002.0 + 300, c)


def test_counts_restart_when_the_window_has_passed() -> None:
    c, _ = after_failure(0.0, Counters(), P)
    c, _ = after_failure(10.0, c, P)
    assert c.failures == 2
    c, locked = after_failure(61.0, c, P)  # 61 s after the first failure: a new run
    assert not locked and c.failures == 1 and c.window_start == 61.0


def test_success_resets_the_run() -> None:
    c, _ = after_failure(0.0, Counters(), P)
    c, _ = after_failure(1.0, c, P)
    c = after_success()
    c, locked = after_failure(2.0, c, P)
    assert not locked and c.failures == 1


def test_failures_while_locked_do_not_extend_the_lock() -> None:
    c = fail_n(3)[-1][0]
    until = c.locked_until
    c2, locked = after_failure(1100.0, c, P)
    assert c2 == c and not locked and c2.locked_until == until


def test_after_the_lock_expires_counting_starts_afresh() -> None:
    c = fail_n(3)[-1][0]
    assert c.locked_until is not None
    c2, locked = after_failure(c.locked_until + 1, c, P)
    assert not locked and c2.failures == 1 and c2.locked_until is None


def test_duration_zero_locks_until_unlock_for_accounts() -> None:
    p = Policy(threshold=2, window=60, duration=0)
    c = fail_n(2, p=p)[-1][0]
    assert c.locked_until == FOREVER
    assert is_locked(4_000_000_000.0, c)


def test_duration_zero_disables_source_blocking() -> None:
    p = Policy(threshold=1, window=60, duration=0, zero_is_forever=False)
    c, locked = after_failure(0.0, Counters(), p)
    assert not locked and not is_locked(0.0, c)


def test_policies_come_from_the_auth_section() -> None:
    auth = AuthConfig(lockout_threshold=7, lockout_window=100, lockout_duration=50,
                      source_block_threshold=30, source_block_duration=600)
    assert Policy.for_accounts(auth) == Policy(7, 100, 50, True)
    assert Policy.for_sources(auth) == Policy(30, 100, 600, False)


def test_threshold_one_locks_on_first_failure_and_lock_by_hand_is_forever() -> None:
    p = Policy(threshold=1, window=10, duration=5)
    assert fail_n(1, p=p)[0][1]
    assert lockout.locked_by_hand().locked_until == FOREVER
