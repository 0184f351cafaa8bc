"""Password hashing and policy (pacsd.auth.passwords)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacsd.auth import passwords
from pacsd.auth.passwords import PasswordRejected, check_policy, hash_password, verify_password
from pacsd.config import PasswordConfig
from pacsd.errors import EnvironmentProblem, PolicyViolation

POLICY = PasswordConfig(bcrypt_rounds=10)
GOOD = "violet orbit hammock 42"


def rule_of(policy: PasswordConfig, password: str, **kw: object) -> str:
    with pytest.raises(PasswordRejected) as info:
        check_policy(policy, password, username=kw.pop("username", "alice"), **kw)  # type: ignore[arg-type]
    assert isinstance(info.value, PolicyViolation)
    assert f"rule {info.value.rule}" in str(info.value)
    return info.value.rule


def test_a_good_password_passes() -> None:
    assert check_policy(POLICY, GOOD, username="alice") == GOOD


def test_too_short_names_min_length() -> None:
    assert rule_of(POLICY, "short pass 1") == "min_length"
    with pytest.raises(PasswordRejected, match="at least 15 characters"):
        check_policy(POLICY, "x" * 14, username="a")


def test_totp_users_have_an_8_floor_only_when_the_site_lowers_min_length() -> None:
    low = PasswordConfig(min_length=8)
    assert check_policy(low, "kq7#Vw2m", username="alice", has_totp=True)
    assert rule_of(low, "kq7#Vw2m", has_totp=False) == "min_length"  # 15 without TOTP
    assert rule_of(low, "kq7#Vw2", has_totp=True) == "min_length"
    assert rule_of(POLICY, "kq7#Vw2m", has_totp=True) == "min_length"  # min_length 15 stands


def test_common_password_names_common() -> None:
    low = PasswordConfig(min_length=8)
    assert rule_of(low, "password1", has_totp=True) == "common"
    assert rule_of(low, "Baseball", has_totp=True) == "common"  # case-insensitive
    assert rule_of(POLICY, "1qaz2wsx3edc4rfv") == "common"  # a 15-character entry


def test_builtin_list_has_at_least_ten_thousand_entries() -> None:
    common = passwords.common_passwords()
    assert len(common) >= 10_000
    assert {"123456", "password", "dragon", "letmein"} <= common


def test_same_as_user_name_names_username() -> None:
    assert rule_of(POLICY, "radiographer-ct1", username="radiographer-ct1") == "username"
    assert rule_of(POLICY, "MyNameIsAlice!!!x", username="alice") == "username"


def test_ae_title_names_ae_title() -> None:
    assert rule_of(POLICY, "ct_scanner_room_4", ae_titles=["CT_SCANNER"]) == "ae_title"


def test_site_blocklist(tmp_path: Path) -> None:
    block = tmp_path / "block.txt"
    block.write_text("hospital-name-2024\n\n")
    policy = PasswordConfig(blocklist=str(block))
    assert rule_of(policy, "Hospital-Name-2024") == "blocklist"
    with pytest.raises(EnvironmentProblem, match="blocklist"):
        check_policy(PasswordConfig(blocklist=str(tmp_path / "missing")), GOOD, username="a")


def test_min_classes_and_max_length_and_control_characters() -> None:
    assert rule_of(PasswordConfig(min_classes=3), "all lower case words") == "min_classes"
    assert check_policy(PasswordConfig(min_classes=3), "Lower Upper 123", username="x")
    assert rule_of(PasswordConfig(max_length=64), "y" * 65) == "max_length"
    assert rule_of(POLICY, "tab\tinside the password") == "characters"


def test_history_reuse_names_history() -> None:
    old = [hash_password(GOOD, 10), hash_password("an older long secret", 10)]
    assert rule_of(POLICY, "an older long secret", previous_hashes=old) == "history"
    assert check_policy(POLICY, "a brand new long secret", username="a", previous_hashes=old)


def test_a_100_character_password_works() -> None:
    pw = "correct horse battery staple " * 3 + "x" * 13
    assert len(pw) == 100
    assert check_policy(POLICY, pw, username="alice") == pw
    assert verify_password(pw, hash_password(pw, 10))


def test_a_password_differing_only_after_byte_72_does_not_verify() -> None:
    base = "k" * 72
    h = hash_password(base + "-first", 10)
    assert verify_password(base + "-first", h)
    assert not verify_password(base + "-other", h)
    assert not verify_password(base, h)


def test_nfkc_normalisation() -> None:
    h = hash_password("ﬁle cabinet number ①", 10)  # ligature fi, circled one
    assert verify_password("file cabinet number 1", h)


def test_rehash_when_rounds_were_raised_and_malformed_hash() -> None:
    h = hash_password(GOOD, 10)
    assert passwords.hash_cost(h) == 10
    assert passwords.needs_rehash(h, 11)
    assert not passwords.needs_rehash(h, 10)
    assert not verify_password(GOOD, "not a hash")
    assert passwords.dummy_verify(GOOD, 10) is False
