"""Password hashing (bcrypt) and the password policy of `[auth.password]`.

Hashing: NFKC-normalise, pre-hash, then bcrypt. Why the pre-hash: bcrypt uses only
the first 72 bytes of its input, so two long passwords sharing their first 72 bytes
would both verify. HMAC-SHA-256 over the whole UTF-8 password, base64-encoded, is 44
ASCII bytes without NUL (bcrypt also stops at NUL), so every byte of the password
counts. The HMAC key is not a secret pepper, only a fixed domain string that keeps
these digests distinct from any other use of SHA-256 on the same password; base64
keeps raw digest bytes (which may contain NUL) out of bcrypt.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import unicodedata
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import bcrypt

from pacsd.config import PasswordConfig
from pacsd.errors import EnvironmentProblem, PolicyViolation

# Fixed and public by design (see the module docstring); changing it invalidates every hash.
PREHASH_DOMAIN = b"pacsd/bcrypt-prehash/v1"

# Floors from NIST SP 800-63B-4: 15 characters for a password used alone, 8 with MFA.
SINGLE_FACTOR_FLOOR = 15
MFA_FLOOR = 8

# A syntactically valid bcrypt hash that no password matches in practice; checked when
# there is no real hash (unknown user) so that path costs one bcrypt like the others.
_DUMMY_TAIL = "6QX8yqjbNm0dK2FvBqGqXeQ0cM3jvl8w7sZKq1yQfVv5eD1z2bQ7W"


class PasswordRejected(PolicyViolation):
    """A password broke a policy rule; `rule` names it (e.g. "min_length", "common")."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"password refused (rule {rule}): {message}")
        self.rule = rule


def normalize(password: str) -> str:
    return unicodedata.normalize("NFKC", password)


def _prehash(password: str) -> bytes:
    # surrogateescape: bytes that were not UTF-8 on the wire keep their identity; the
    # policy refuses such characters, so they can never match a stored password.
    data = normalize(password).encode("utf-8", "surrogateescape")
    return base64.b64encode(hmac.new(PREHASH_DOMAIN, data, hashlib.sha256).digest())


def hash_password(password: str, rounds: int) -> str:
    """The bcrypt hash (cost `rounds`) of the normalised, pre-hashed password."""
    return bcrypt.hashpw(_prehash(password), bcrypt.gensalt(rounds)).decode("ascii")


def verify_password(password: str, hashed: str) -> bool:
    """True when `password` matches `hashed`; a malformed hash never matches."""
    try:
        return bcrypt.checkpw(_prehash(password), hashed.encode("ascii"))
    except ValueError:
        return False


def dummy_verify(password: str, rounds: int) -> bool:
    """Spend one bcrypt of cost `rounds` on `password` and return False."""
    bcrypt.checkpw(_prehash(password), f"$2b${rounds:02d}${_DUMMY_TAIL}".encode("ascii"))
    return False


def hash_cost(hashed: str) -> int:
    """The bcrypt cost of a "$2b$NN$..." hash; 0 when it cannot be read."""
    parts = hashed.split("$")
    try:
        return int(parts[2])
    except (IndexError, ValueError):
        return 0


def needs_rehash(hashed: str, rounds: int) -> bool:
    """True when the configured cost was raised above the cost of this hash."""
    return hash_cost(hashed) < rounds


# --------------------------------------------------------------------------- blocklists


def _fold(word: str) -> str:
    return normalize(word).casefold()


@functools.lru_cache(maxsize=1)
def common_passwords() -> frozenset[str]:
    """The built-in list (30,000 most common passwords, from zxcvbn), case-folded."""
    text = resources.files("pacsd").joinpath("data/common-passwords.txt").read_text("utf-8")
    return frozenset(_fold(w) for w in text.splitlines() if w.strip())


@functools.lru_cache(maxsize=4)
def _site_list(path: str, mtime_ns: int) -> frozenset[str]:
    text = Path(path).read_text("utf-8")
    return frozenset(_fold(w.strip()) for w in text.splitlines() if w.strip())


def site_blocklist(path: str) -> frozenset[str]:
    """The site's own list ([auth.password] blocklist); raises EnvironmentProblem if unreadable."""
    if not path:
        return frozenset()
    try:
        return _site_list(path, Path(path).stat().st_mtime_ns)
    except (OSError, UnicodeDecodeError) as exc:
        raise EnvironmentProblem(f"auth.password.blocklist: cannot read {path}: {exc}") from None


# --------------------------------------------------------------------------- policy


def char_classes(password: str) -> int:
    """How many of lower, upper, digit, other (symbol) the password uses."""
    lower = any(c.islower() for c in password)
    upper = any(c.isupper() for c in password)
    digit = any(c.isdigit() for c in password)
    other = any(not (c.islower() or c.isupper() or c.isdigit()) for c in password)
    return lower + upper + digit + other


def required_length(policy: PasswordConfig, *, has_totp: bool) -> int:
    """min_length, but never under 15 for a password used alone nor under 8 with TOTP."""
    return max(policy.min_length, MFA_FLOOR if has_totp else SINGLE_FACTOR_FLOOR)


def _contains_context(folded: str, word: str) -> bool:
    w = _fold(word).strip()
    if not w:
        return False
    # short words (e.g. a 2-letter AE title) only when they are the whole password
    return folded == w if len(w) < 4 else w in folded


def check_policy(
    policy: PasswordConfig,
    password: str,
    *,
    username: str,
    ae_titles: Iterable[str] = (),
    has_totp: bool = False,
    previous_hashes: Iterable[str] = (),
) -> str:
    """Return the normalised password if every rule passes; raises PasswordRejected naming one.

    Also raises EnvironmentProblem when the configured site blocklist cannot be read.
    """
    pw = normalize(password)
    if any(unicodedata.category(c) in ("Cc", "Cs", "Cn") for c in pw):
        raise PasswordRejected("characters", "control or unassigned characters are not allowed")
    need = required_length(policy, has_totp=has_totp)
    if len(pw) < need:
        why = " (user has TOTP)" if has_totp else " (no TOTP)"
        raise PasswordRejected("min_length", f"at least {need} characters are required{why}")
    if len(pw) > policy.max_length:
        raise PasswordRejected("max_length", f"at most {policy.max_length} characters")
    if char_classes(pw) < policy.min_classes:
        raise PasswordRejected(
            "min_classes",
            f"use at least {policy.min_classes} of: lower case, upper case, digits, symbols",
        )
    folded = _fold(pw)
    if folded in common_passwords():
        raise PasswordRejected("common", "this password is in the list of common passwords")
    if folded in site_blocklist(policy.blocklist):
        raise PasswordRejected("blocklist", "this password is in the site's blocklist")
    if _contains_context(folded, username):
        raise PasswordRejected("username", "the password must not contain the user name")
    for title in ae_titles:
        if _contains_context(folded, title):
            raise PasswordRejected("ae_title", "the password must not contain an AE title")
    for old in previous_hashes:
        if verify_password(pw, old):
            raise PasswordRejected(
                "history", f"reuse of one of the last {policy.history} passwords"
            )
    return pw
