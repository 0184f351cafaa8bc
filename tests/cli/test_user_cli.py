"""`pacsd user ...` as a sysadmin runs it: exit codes, output, audit records, nothing in clear."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

PW = "violet orbit hammock 42"


@dataclass
class Site:
    dir: Path
    sock: socket.socket

    @property
    def cfg(self) -> Path:
        return self.dir / "pacsd.toml"

    @property
    def db(self) -> Path:
        return self.dir / "data" / "users.sqlite"

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pacsd", "--config", str(self.cfg), "user", *args],
            input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True, text=True, timeout=60,
            start_new_session=True,  # no controlling terminal: getpass cannot prompt
        )

    def audit_records(self) -> list[dict[str, Any]]:
        out = []
        while True:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, TimeoutError):
                return out
            text = data.decode("utf-8", "replace")
            out.append(json.loads(text[text.index("{"):]))

    def db_bytes(self) -> bytes:
        return b"".join(p.read_bytes() for p in self.db.parent.glob("users.sqlite*"))


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    sock_dir = Path(tempfile.mkdtemp(prefix="pacsd-ut-"))  # unix socket paths are short
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_dir / "log"))
    sock.settimeout(0.5)
    (tmp_path / "tls").mkdir()
    key = tmp_path / "tls" / "storage.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    (tmp_path / "pacsd.toml").write_text(
        '[node]\nae_title = "PACSD"\n'
        f'[audit]\nsyslog = "unix://{sock_dir / "log"}"\n'
        "[auth.password]\nbcrypt_rounds = 10\nhistory = 3\n"
    )
    yield Site(tmp_path, sock)
    sock.close()
    with contextlib.suppress(OSError):
        (sock_dir / "log").unlink()
        sock_dir.rmdir()


def test_add_list_and_audit(site: Site) -> None:
    r = site.run("add", "alice", "--role", "modality", "--password-stdin", stdin=PW + "\n")
    assert r.returncode == 0, r.stderr
    assert "alice" in r.stdout and "modality" in r.stdout
    r = site.run("list")
    assert r.returncode == 0
    assert "alice" in r.stdout and "active" in r.stdout and "never" in r.stdout
    items = json.loads(site.run("list", "--json").stdout)
    assert items == [{"name": "alice", "role": "modality", "state": "active", "mfa": False,
                      "locked_until": None, "last_login": None, "last_address": None}]
    records = [r for r in site.audit_records() if r.get("event") == "admin.user"]
    assert records and records[0]["action"] == "add" and records[0]["target_user"] == "alice"
    assert records[0]["operator"] and records[0]["outcome"] == 0
    assert PW not in json.dumps(records)
    assert PW.encode() not in site.db_bytes()


def test_add_refusals_name_the_rule(site: Site) -> None:
    cases = {
        "short but ok 1": "min_length",
        "1qaz2wsx3edc4rfv": "common",
        "alice-the-radiographer": "username",
        "pacsd-node-password": "ae_title",  # contains the node's own AE title
    }
    for pw, rule in cases.items():
        r = site.run("add", "alice", "--role", "admin", "--password-stdin", stdin=pw + "\n")
        assert r.returncode == 2, (pw, r.stdout, r.stderr)
        assert f"rule {rule}" in r.stderr, (pw, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert json.loads(site.run("list", "--json").stdout) == []


def test_usage_errors(site: Site) -> None:
    ok = site.run("add", "alice", "--role", "admin", "--password-stdin", stdin=PW + "\n")
    assert ok.returncode == 0, ok.stderr
    again = site.run("add", "alice", "--role", "admin", "--password-stdin", stdin=PW + "\n")
    assert again.returncode == 2 and "already exists" in again.stderr
    r = site.run("add", "bob", "--role", "admin")  # no terminal, no --password-stdin
    assert r.returncode == 2 and "--password-stdin" in r.stderr
    r = site.run("add", "bob", "--role", "admin", "--password-stdin", stdin="")
    assert r.returncode == 2 and "no password" in r.stderr
    r = site.run("add", "bad name!", "--role", "admin", "--password-stdin", stdin=PW + "\n")
    assert r.returncode == 2 and "not a valid user name" in r.stderr
    r = site.run("add", "bob", "--role", "root", "--password-stdin", stdin=PW + "\n")
    assert r.returncode == 2
    for cmd in ("lock", "unlock", "disable", "enable", "totp", "passwd"):
        r = site.run(cmd, "nobody", *(["--password-stdin"] if cmd == "passwd" else []),
                     stdin=PW + "\n")
        assert r.returncode == 2 and "does not exist" in r.stderr, (cmd, r.stderr)


def test_passwd_and_history(site: Site) -> None:
    site.run("add", "alice", "--role", "workstation", "--password-stdin", stdin=PW + "\n")
    r = site.run("passwd", "alice", "--password-stdin", stdin=PW + "\n")
    assert r.returncode == 2 and "rule history" in r.stderr
    second = "second long passphrase"
    r = site.run("passwd", "alice", "--password-stdin", stdin=second + "\n")
    assert r.returncode == 0, r.stderr
    r = site.run("passwd", "alice", "--password-stdin", stdin=PW + "\n")
    assert r.returncode == 2 and "rule history" in r.stderr
    r = site.run("passwd", "alice", "--password-stdin", stdin="a third long passphrase\n")
    assert r.returncode == 0
    actions = [r["action"] for r in site.audit_records() if r.get("event") == "admin.user"]
    assert actions == ["add", "passwd", "passwd"]


def test_lock_unlock_disable_enable(site: Site) -> None:
    site.run("add", "alice", "--role", "admin", "--password-stdin", stdin=PW + "\n")

    def state() -> str:
        return str(json.loads(site.run("list", "--json").stdout)[0]["state"])

    for cmd, want in (("lock", "locked"), ("unlock", "active"), ("disable", "disabled"),
                      ("enable", "active")):
        r = site.run(cmd, "alice")
        assert r.returncode == 0, r.stderr
        assert state() == want, cmd
    actions = [r["action"] for r in site.audit_records() if r.get("event") == "admin.user"]
    assert actions == ["add", "lock", "unlock", "disable", "enable"]


def test_totp_enrolment_prints_uri_and_qr_and_stores_sealed(site: Site) -> None:
    site.run("add", "alice", "--role", "modality", "--password-stdin", stdin=PW + "\n")
    r = site.run("totp", "alice")
    assert r.returncode == 0, r.stderr
    uri = next(line for line in r.stdout.splitlines() if line.startswith("otpauth://totp/"))
    assert "alice" in uri and "issuer=pacsd" in uri
    assert "█" in r.stdout  # the terminal QR code
    secret = uri.split("secret=")[1].split("&")[0]
    assert len(secret) == 32
    data = site.db_bytes()
    assert secret.encode() not in data and PW.encode() not in data
    assert json.loads(site.run("list", "--json").stdout)[0]["mfa"] is True
    records = [r for r in site.audit_records() if r.get("event") == "admin.user"]
    assert records[-1]["action"] == "totp_enrol"
    assert secret not in json.dumps(records)


def test_totp_without_storage_key_fails_clearly(site: Site) -> None:
    site.run("add", "alice", "--role", "modality", "--password-stdin", stdin=PW + "\n")
    (site.dir / "tls" / "storage.key").unlink()
    r = site.run("totp", "alice")
    assert r.returncode == 2
    assert "storage key" in r.stderr and "Traceback" not in r.stderr
    assert "otpauth" not in r.stdout


def test_review_flags_and_disables_stale_accounts(site: Site) -> None:
    for name in ("alice", "bob"):
        r = site.run("add", name, "--role", "modality", "--password-stdin", stdin=PW + "\n")
        assert r.returncode == 0, r.stderr
    old = time.time() - 100 * 86_400
    with sqlite3.connect(site.db) as con:  # alice logged in 100 days ago, from 10.1.2.3
        con.execute("UPDATE app_user SET created = ?, password_set = ?, last_login = ?, "
                    "last_address = '10.1.2.3' WHERE name = 'alice'", (old, old, old))
    con.close()
    site.run("lock", "bob")
    report = json.loads(site.run("review", "--json").stdout)
    by = {u["name"]: u for u in report["users"]}
    assert by["alice"]["flags"] == ["stale"] and by["alice"]["last_address"] == "10.1.2.3"
    assert by["alice"]["password_age_days"] == 100 and by["alice"]["mfa"] is False
    assert set(by["bob"]["flags"]) == {"locked", "never_used"}
    assert report["disabled"] == []
    r = site.run("review")
    assert r.returncode == 0 and "stale" in r.stdout and "100d" in r.stdout
    r = site.run("review", "--idle-days", "200", "--json")
    assert json.loads(r.stdout)["users"][0]["flags"] == []
    r = site.run("review", "--disable")
    assert r.returncode == 0 and "disabled 1 stale account(s): alice" in r.stdout
    states = {u["name"]: u["state"] for u in json.loads(site.run("list", "--json").stdout)}
    assert states == {"alice": "disabled", "bob": "locked"}
    rec = [r for r in site.audit_records() if r.get("action") == "disable"]
    assert rec and rec[0]["target_user"] == "alice"
    assert site.run("review", "--idle-days", "0").returncode == 2
