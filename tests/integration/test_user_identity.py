"""Gates 4-5 with users (DESIGN §4) against the real daemon: DCMTK storescu --user/--password
and pynetdicom where DCMTK cannot express the case (C-FIND with a user)."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pyotp
import pytest

from tests.conftest import Client, Node, dcmtk_path, make_dataset, needs_dcmtk

pytestmark = needs_dcmtk

PW = "violet orbit hammock 42"
WS_PW = "quiet lantern meadow 7"


def started(node_factory: Any, **auth: Any) -> Node:
    """A node with cheap bcrypt (cost 10) and the given [auth] overrides."""
    n: Node = node_factory(start=False)
    n.set_config("auth.password", "bcrypt_rounds", 10)
    for key, value in auth.items():
        n.set_config("auth", key, value)
    n.start()
    return n


def add_user(n: Node, name: str, role: str, pw: str = PW) -> None:
    r = n.cli("user", "add", name, "--role", role, "--password-stdin", input=pw + "\n")
    assert r.returncode == 0, r.stderr


def store(n: Node, client: Client, tmp: Path, *user: str) -> bool:
    """storescu one object; True when the store succeeded (association accepted, status 0)."""
    f = make_dataset(tmp / f"obj-{time.monotonic_ns()}.dcm")
    args: list[str] = []
    if user and user[0].startswith("--"):  # another identity option, e.g. --jwt FILE
        args += list(user)
    elif user:
        args += ["--user", user[0]]
        if len(user) > 1:
            args += ["--password", user[1]]
    # storescu takes the file after peer and port, so Node.dcmtk (arguments before) won't do
    cmd = [dcmtk_path("storescu"), *n.tls_args(client), "-aet", client.title, "-aec",
           n.ae_title, "-v", *args, "127.0.0.1", str(n.port), str(f)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "TCP_NODELAY": "1"})
    out = r.stderr + r.stdout
    return r.returncode == 0 and "Received Store Response (Success)" in out


def failures(n: Node, reason: str) -> list[dict[str, Any]]:
    return n.audit.wait_for(lambda r: r.get("event") == "auth.failure"
                            and r.get("reason") == reason, timeout=5)


@pytest.fixture
def site(node_factory: Any) -> tuple[Node, Client]:
    n = started(node_factory, lockout_threshold=3, source_block_threshold=50)
    mod = n.add_client("MOD1", permits="echo,store,find", extra=("--require-user",))
    add_user(n, "alice", "modality")
    return n, mod


def test_right_password_accepted_and_audited(site: tuple[Node, Client], tmp_path: Path) -> None:
    n, mod = site
    assert store(n, mod, tmp_path, "alice", PW)
    logins = n.audit.wait_for(lambda r: r.get("event") == "auth.login")
    assert logins and logins[0]["user"] == "alice" and logins[0]["calling_ae"] == "MOD1"
    listed = json.loads(n.cli("user", "list", "--json").stdout)
    assert listed[0]["last_address"] == "127.0.0.1" and listed[0]["last_login"]


def test_refusals(site: tuple[Node, Client], tmp_path: Path) -> None:
    n, mod = site
    add_user(n, "bob", "modality")
    assert not store(n, mod, tmp_path)  # no identity on a --require-user AE
    assert n.audit.wait_for(lambda r: r.get("event") == "assoc.rejected"
                            and r.get("gate") == "user_identity")
    assert not store(n, mod, tmp_path, "alice", PW + "x")
    assert failures(n, "bad_password")
    assert not store(n, mod, tmp_path, "nosuchuser", PW)
    assert failures(n, "unknown_user")
    assert not store(n, mod, tmp_path, "alice")  # type 1 (name only) on a --require-user AE
    assert failures(n, "password_required")
    assert n.cli("user", "disable", "bob").returncode == 0
    assert not store(n, mod, tmp_path, "bob", PW)
    assert failures(n, "disabled")
    jwt = tmp_path / "token.jwt"
    jwt.write_text("eyJhbGciOiJub25lIn0.e30.")
    assert not store(n, mod, tmp_path, "--jwt", str(jwt))  # type 5
    assert failures(n, "unsupported_type")
    assert store(n, mod, tmp_path, "alice", PW)  # one failure of alice above: not locked


def test_expired_password_refused(node_factory: Any, tmp_path: Path) -> None:
    n = started(node_factory)
    n.set_config("auth.password", "max_age_days", 1)  # a running node reads users fresh,
    mod = n.add_client("MOD1", extra=("--require-user",))  # config at start: restart below
    add_user(n, "old", "modality")
    import sqlite3

    with sqlite3.connect(n.dir / "data" / "users.sqlite") as con:
        con.execute("UPDATE app_user SET password_set = password_set - 3 * 86400")
    con.close()
    n.stop()
    n.start()
    assert not store(n, mod, tmp_path, "old", PW)
    assert failures(n, "expired")


def test_lockout_then_unlock(site: tuple[Node, Client], tmp_path: Path) -> None:
    n, mod = site
    for _ in range(3):
        assert not store(n, mod, tmp_path, "alice", "wrong password here")
    assert n.audit.wait_for(lambda r: r.get("event") == "auth.lockout")
    assert not store(n, mod, tmp_path, "alice", PW)  # even the right one
    assert failures(n, "locked")
    assert n.cli("user", "unlock", "alice").returncode == 0
    assert store(n, mod, tmp_path, "alice", PW)


def test_totp(site: tuple[Node, Client], tmp_path: Path) -> None:
    n, mod = site
    r = n.cli("user", "totp", "alice")
    assert r.returncode == 0, r.stderr
    uri = next(line for line in r.stdout.splitlines() if line.startswith("otpauth://"))
    otp = pyotp.parse_uri(uri)
    code = otp.now()
    assert not store(n, mod, tmp_path, "alice", PW)  # password alone
    assert store(n, mod, tmp_path, "alice", PW + code)
    assert not store(n, mod, tmp_path, "alice", PW + code)  # the same code twice
    assert failures(n, "totp_replay")
    # nothing secret in the daemon's log or the audit trail
    everything = n.log_text() + "\n".join(n.audit.messages)
    for needle in (PW, PW + code, otp.secret):
        assert needle not in everything
    # the 6-digit code alone could occur by chance inside a timestamp or hash: no field is it
    assert not any(code in (str(v) for v in rec.values()) for rec in n.audit.records())
    db = b"".join(p.read_bytes() for p in (n.dir / "data").glob("users.sqlite*"))
    assert b"alice" in db
    for needle in (PW, otp.secret):
        assert needle.encode() not in db


def test_roles_workstation_cannot_store(site: tuple[Node, Client], tmp_path: Path) -> None:
    n, mod = site
    add_user(n, "ws", "workstation", WS_PW)
    assert not store(n, mod, tmp_path, "ws", WS_PW)  # associated, but the store is refused
    denied = n.audit.wait_for(lambda r: "not permitted" in str(r.get("reason", "")))
    assert denied and denied[0].get("user") == "ws"


def test_roles_modality_cannot_query(site: tuple[Node, Client]) -> None:
    n, mod = site
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.pdu_primitives import UserIdentityNegotiation
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    ae = AE(ae_title="MOD1")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    uid = UserIdentityNegotiation()
    uid.user_identity_type = 2
    uid.primary_field = b"alice"
    uid.secondary_field = PW.encode()
    assoc = ae.associate("127.0.0.1", n.port, ae_title=n.ae_title, ext_neg=[uid],
                         tls_args=(n.ssl_context(mod), None))
    assert assoc.is_established
    try:
        if not assoc.accepted_contexts:
            pytest.skip("the node does not offer C-FIND yet")
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = ""
        statuses = [int(s.Status) for s, _ in assoc.send_c_find(
            q, StudyRootQueryRetrieveInformationModelFind) if s]
        assert statuses and statuses[-1] not in (0x0000, 0xFF00, 0xFF01)
        assert assoc.is_established  # the association stays usable
    finally:
        assoc.release()


def test_blocked_source_cannot_finish_tls(node_factory: Any, tmp_path: Path) -> None:
    n = started(node_factory, source_block_threshold=3, source_block_duration=30)
    mod = n.add_client("MOD1", extra=("--require-user",))
    for i in range(3):
        assert not store(n, mod, tmp_path, f"guess{i}", "not a password")
    assert n.audit.wait_for(lambda r: r.get("event") == "alert.anomaly"
                            and r.get("reason") == "source_blocked")
    ctx = n.ssl_context(mod)
    with socket.create_connection(("127.0.0.1", n.port), timeout=10) as raw, \
            pytest.raises((ssl.SSLError, OSError)):
        ctx.wrap_socket(raw).close()
