"""Gate 4 decisions (pacsd.auth.identity) against a real auth database in a temp dir."""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import bcrypt
import pytest

from pacsd import config
from pacsd.auth import identity, passwords, totp, users
from pacsd.auth import secrets as sealed
from pacsd.auth.database import open_auth_db
from pacsd.auth.identity import IdentityDecision, verify_identity
from pacsd.config import Config

PW = "violet orbit hammock 42"
T0 = 1_800_000_000.0

BASE = """
[auth]
lockout_threshold = 3
lockout_window = 60
lockout_duration = 120
source_block_threshold = 5
source_block_duration = 60
[auth.password]
bcrypt_rounds = 10
max_age_days = 30
"""


def make_cfg(tmp_path: Path, text: str = BASE) -> Config:
    (tmp_path / "tls").mkdir(exist_ok=True)
    key = tmp_path / "tls" / "storage.key"
    if not key.exists():
        key.write_bytes(os.urandom(32))
        key.chmod(0o600)
    (tmp_path / "pacsd.toml").write_text(text)
    cfg = config.load(tmp_path / "pacsd.toml")
    open_auth_db(cfg)
    return cfg


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    c = make_cfg(tmp_path)
    users.add("alice", "modality", passwords.hash_password(PW, 10), now=T0)
    return c


Verify = Callable[..., IdentityDecision]


def login(cfg: Config, name: str, passcode: str, *, ip: str = "10.0.0.1", now: float = T0,
          require_user: bool = True) -> IdentityDecision:
    return verify_identity(cfg, user_type=2, primary=name.encode(), secondary=passcode.encode(),
                           source_ip=ip, require_user=require_user, now=now)


def enrol(cfg: Config, name: str) -> str:
    secret = totp.new_secret()
    box = sealed.box_for(cfg)
    users.set_totp_secret(name, box.seal(secret.encode(), aad=identity.aad_for(name)))
    return secret


def test_right_password_is_accepted_with_role(cfg: Config) -> None:
    d = login(cfg, "alice", PW)
    assert (d.ok, d.username, d.role, d.reason) == (True, "alice", "modality", "ok")
    assert d.new_source
    assert not login(cfg, "alice", PW, now=T0 + 1).new_source
    assert login(cfg, "alice", PW, ip="10.0.0.9", now=T0 + 2).new_source
    info = users.info("alice")
    assert info.last_login == T0 + 2 and info.last_address == "10.0.0.9"


def test_wrong_password_and_unknown_user(cfg: Config) -> None:
    d = login(cfg, "alice", PW + "x")
    assert (d.ok, d.reason, d.username) == (False, "bad_password", "alice")
    d = login(cfg, "mallory", PW)
    assert (d.ok, d.reason, d.username, d.role) == (False, "unknown_user", None, None)


def test_lockout_after_threshold_then_duration_passes(cfg: Config) -> None:
    results = [login(cfg, "alice", "wrong", ip=f"10.0.1.{i}", now=T0 + i) for i in range(3)]
    assert [r.locked_now for r in results] == [False, False, True]
    assert login(cfg, "alice", PW, ip="10.0.2.1", now=T0 + 10).reason == "locked"
    assert login(cfg, "alice", PW, ip="10.0.2.2", now=T0 + 2 + 121).ok


def test_success_resets_the_failure_count(cfg: Config) -> None:
    for i in range(2):
        login(cfg, "alice", "wrong", ip=f"10.0.1.{i}", now=T0 + i)
    assert login(cfg, "alice", PW, now=T0 + 3).ok
    for i in range(2):
        assert not login(cfg, "alice", "wrong", ip=f"10.0.3.{i}", now=T0 + 4 + i).locked_now
    assert login(cfg, "alice", PW, now=T0 + 7).ok


def test_duration_zero_locks_until_unlock(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, BASE.replace("lockout_duration = 120", "lockout_duration = 0"))
    users.add("bob", "workstation", passwords.hash_password(PW, 10), now=T0)
    for i in range(3):
        login(cfg, "bob", "wrong", ip=f"10.0.1.{i}", now=T0 + i)
    assert login(cfg, "bob", PW, now=T0 + 86_400 * 29).reason == "locked"
    users.unlock("bob")
    assert login(cfg, "bob", PW, now=T0 + 86_400 * 29).ok


def test_disabled_and_expired_accounts(cfg: Config) -> None:
    users.set_enabled("alice", False)
    assert login(cfg, "alice", PW).reason == "disabled"
    users.set_enabled("alice", True)
    assert login(cfg, "alice", PW, now=T0 + 31 * 86_400).reason == "expired"
    assert login(cfg, "alice", PW, now=T0 + 29 * 86_400).ok


def test_identity_types(cfg: Config) -> None:
    def typed(t: int, require: bool) -> IdentityDecision:
        return verify_identity(cfg, user_type=t, primary=b"alice", secondary=b"",
                               source_ip="10.0.0.1", require_user=require, now=T0)

    assert typed(1, True).reason == "password_required" and not typed(1, True).ok
    d = typed(1, False)
    assert d.ok and d.username is None and d.role is None  # an unverified name grants nothing
    for t in (3, 4, 5):
        assert typed(t, False).reason == "unsupported_type" and not typed(t, False).ok


def test_totp_password_plus_code(cfg: Config) -> None:
    secret = enrol(cfg, "alice")
    code = totp.code_at(secret, T0)
    assert login(cfg, "alice", PW + code).ok
    assert login(cfg, "alice", PW + code, now=T0 + 1).reason == "totp_replay"
    assert not login(cfg, "alice", PW, now=T0 + 2).ok  # password alone
    wrong = f"{(int(totp.code_at(secret, T0 + 60)) + 1) % 1_000_000:06d}"
    assert login(cfg, "alice", PW + wrong, now=T0 + 60).reason == "bad_totp"
    users.unlock("alice")  # three failures above reached the threshold
    # an older step after a newer one was used is a replay too
    assert login(cfg, "alice", PW + totp.code_at(secret, T0 + 90), now=T0 + 90).ok
    assert login(cfg, "alice", PW + totp.code_at(secret, T0 + 60),
                 now=T0 + 90).reason == "totp_replay"


def test_two_workers_cannot_both_accept_one_code(cfg: Config) -> None:
    secret = enrol(cfg, "alice")
    code = totp.code_at(secret, T0)
    out: list[IdentityDecision] = []
    barrier = threading.Barrier(2)

    def worker() -> None:
        barrier.wait()
        out.append(login(cfg, "alice", PW + code))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(d.reason for d in out) == ["ok", "totp_replay"]


def test_source_blocking(cfg: Config) -> None:
    ip = "192.0.2.7"
    results = [login(cfg, f"nobody{i}", "x", ip=ip, now=T0 + i) for i in range(5)]
    assert [r.source_blocked_now for r in results] == [False] * 4 + [True]
    assert identity.source_blocked(cfg, ip, now=T0 + 10)
    assert not identity.source_blocked(cfg, "192.0.2.8", now=T0 + 10)
    assert login(cfg, "alice", PW, ip=ip, now=T0 + 10).reason == "source_blocked"
    assert not identity.source_blocked(cfg, ip, now=T0 + 4 + 61)
    assert login(cfg, "alice", PW, ip=ip, now=T0 + 4 + 61).ok


def test_rehash_on_login_when_rounds_were_raised(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, BASE.replace("bcrypt_rounds = 10", "bcrypt_rounds = 11"))
    users.add("carol", "admin", passwords.hash_password(PW, 10), now=T0)
    assert login(cfg, "carol", PW).ok
    row = users.require("carol")
    assert passwords.hash_cost(row.password_hash) == 11
    assert passwords.verify_password(PW, row.password_hash)


def test_every_refusal_path_costs_one_bcrypt_of_the_configured_cost(
    cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    users.add("dave", "admin", passwords.hash_password(PW, 10), now=T0)
    users.add("erin", "admin", passwords.hash_password(PW, 10), now=T0)
    users.add("fred", "admin", passwords.hash_password(PW, 10), now=T0 - 40 * 86_400)
    users.set_enabled("dave", False)
    users.lock("erin")
    calls: list[int] = []
    real = bcrypt.checkpw

    def counting(pw: bytes, hashed: bytes) -> bool:
        calls.append(passwords.hash_cost(hashed.decode()))
        return real(pw, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    cases = {
        ("mallory", PW): "unknown_user",
        ("alice", "wrong one"): "bad_password",
        ("dave", PW): "disabled",
        ("erin", PW): "locked",
        ("fred", PW): "expired",
    }
    for i, ((name, pw), reason) in enumerate(cases.items()):
        calls.clear()
        d = login(cfg, name, pw, ip=f"10.9.0.{i}")
        assert (d.ok, d.reason) == (False, reason)
        assert calls == [10], reason


def test_timing_unknown_user_vs_wrong_password(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, BASE.replace("lockout_threshold = 3", "lockout_threshold = 100")
                   .replace("source_block_threshold = 5", "source_block_threshold = 1000"))
    users.add("alice", "modality", passwords.hash_password(PW, 10), now=T0)
    unknown, wrong = [], []
    for i in range(20):  # interleaved, so drift in machine load hits both alike
        for name, out in (("nosuchuser", unknown), ("alice", wrong)):
            t = time.perf_counter()
            d = login(cfg, name, "not the password", ip=f"10.8.{i}.1", now=time.time())
            out.append(time.perf_counter() - t)
            assert not d.ok
    mu, mw = statistics.median(unknown), statistics.median(wrong)
    # "within noise": 15 % of the median, or 3 median absolute deviations on a busy machine;
    # a path doing one bcrypt more or less would differ by ~100 %
    noise = 3 * max(statistics.median(abs(x - mu) for x in unknown),
                    statistics.median(abs(x - mw) for x in wrong))
    assert abs(mu - mw) < max(0.15 * max(mu, mw), noise), (mu, mw, noise)
    assert abs(mu - mw) < 0.5 * max(mu, mw), (mu, mw)


def test_nothing_secret_in_the_database_in_clear(cfg: Config, tmp_path: Path) -> None:
    secret = enrol(cfg, "alice")
    assert login(cfg, "alice", PW + totp.code_at(secret, T0)).ok
    data = b"".join(p.read_bytes() for p in (tmp_path / "data").glob("users.sqlite*"))
    assert b"alice" in data  # the files were read
    for needle in (PW, secret, secret.lower()):
        assert needle.encode() not in data


def test_oversized_or_empty_fields_are_refused_cheaply(cfg: Config) -> None:
    d = verify_identity(cfg, user_type=2, primary=b"", secondary=b"x", source_ip="10.0.0.1",
                        require_user=True)
    assert not d.ok
    d = verify_identity(cfg, user_type=2, primary=b"alice", secondary=b"x" * 5000,
                        source_ip="10.0.0.1", require_user=True)
    assert not d.ok


def test_invalid_utf8_is_an_unknown_user_not_an_exception(cfg: Config) -> None:
    d = verify_identity(cfg, user_type=2, primary=b"al\xffice", secondary=b"\xfe\xff" * 8,
                        source_ip="10.0.0.1", require_user=True)
    assert (d.ok, d.reason) == (False, "unknown_user")
    d = verify_identity(cfg, user_type=2, primary=b"alice", secondary=PW.encode() + b"\xff",
                        source_ip="10.0.0.1", require_user=True)
    assert (d.ok, d.reason) == (False, "bad_password")
