"""TOTP (RFC 6238) with pyotp: SHA-1, 6 digits, 30 s steps, codes single-use.

`match_step` returns the time step a code belongs to, so the caller can refuse any
step not newer than the last one accepted (replay protection, RFC 6238 §5.2); the
comparison with every candidate in the window is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac

import pyotp

DIGITS = 6
INTERVAL = 30
SECRET_CHARS = 32  # base32 characters: 160 bits, the HMAC-SHA-1 key size RFC 4226 recommends


def new_secret() -> str:
    """A fresh random base32 TOTP secret."""
    return pyotp.random_base32(SECRET_CHARS)


def _totp(secret: str, digits: int, interval: int) -> pyotp.TOTP:
    return pyotp.TOTP(secret, digits=digits, interval=interval, digest=hashlib.sha1)


def code_at(secret: str, when: float, *, digits: int = DIGITS, interval: int = INTERVAL) -> str:
    """The code for the step that contains time `when` (seconds since the epoch)."""
    return _totp(secret, digits, interval).generate_otp(int(when // interval))


def match_step(
    secret: str,
    code: str,
    *,
    now: float,
    valid_window: int,
    digits: int = DIGITS,
    interval: int = INTERVAL,
) -> int | None:
    """The time step (within valid_window steps of now) whose code equals `code`, or None."""
    totp = _totp(secret, digits, interval)
    wanted = code.encode("ascii", "replace")
    current = int(now // interval)
    found: int | None = None
    for step in range(current - valid_window, current + valid_window + 1):
        if step < 0:
            continue
        candidate = totp.generate_otp(step).encode("ascii")
        # no early exit: every candidate is compared, in constant time
        if hmac.compare_digest(candidate, wanted) and found is None:
            found = step
    return found


def provisioning_uri(secret: str, *, account: str, issuer: str) -> str:
    """The otpauth:// URI an authenticator app enrols from."""
    return _totp(secret, DIGITS, INTERVAL).provisioning_uri(name=account, issuer_name=issuer)
