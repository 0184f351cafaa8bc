"""TOTP (pacsd.auth.totp) against RFC 6238 Appendix B, and the step window."""

from __future__ import annotations

import base64

import pytest

from pacsd.auth import totp

# RFC 6238 Appendix B, SHA-1 rows: seed "12345678901234567890", T0 = 0, X = 30, 8 digits.
SEED = base64.b32encode(b"12345678901234567890").decode("ascii")
VECTORS = [
    (59, "94287082"),
    (1111111109, "07081804"),
    (1111111111, "14050471"),
    (1234567890, "89005924"),
    (2000000000, "69279037"),
    (20000000000, "65353130"),
]


@pytest.mark.parametrize(("when", "code"), VECTORS)
def test_rfc6238_appendix_b_vectors(when: int, code: str) -> None:
    assert totp.code_at(SEED, when, digits=8) == code
    assert totp.match_step(SEED, code, now=when, valid_window=0, digits=8) == when // 30


@pytest.mark.parametrize(("when", "code"), VECTORS)
def test_rfc_vectors_do_not_match_at_other_times(when: int, code: str) -> None:
    assert totp.match_step(SEED, code, now=when + 90, valid_window=1, digits=8) is None


def test_valid_window_accepts_neighbouring_steps_only() -> None:
    secret = totp.new_secret()
    now = 1_700_000_000.0
    prev = totp.code_at(secret, now - 30)
    assert totp.match_step(secret, prev, now=now, valid_window=1) == int(now // 30) - 1
    assert totp.match_step(secret, prev, now=now, valid_window=0) is None
    older = totp.code_at(secret, now - 60)
    if older != prev:
        assert totp.match_step(secret, older, now=now, valid_window=1) is None


def test_six_digit_default_and_garbage_codes() -> None:
    secret = totp.new_secret()
    assert len(secret) == 32
    code = totp.code_at(secret, 1_000_000.0)
    assert len(code) == 6 and code.isdigit()
    for bad in ("", "12345", "1234567", "abcdef", "é" * 6):
        assert totp.match_step(secret, bad, now=1_000_000.0, valid_window=1) is None


def test_provisioning_uri() -> None:
    secret = "JBSWY3DPEHPK3PXP" * 2
    uri = totp.provisioning_uri(secret, account="alice", issuer="pacsd PACSD")
    assert uri.startswith("otpauth://totp/")
    assert f"secret={secret}" in uri and "alice" in uri and "issuer=pacsd" in uri
