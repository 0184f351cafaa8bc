"""The audit trail against a real rsyslog: UDP, TCP, TLS and unix transports, outage and
replay, tamper detection on the file rsyslog wrote, ATNA, and no secrets anywhere.

These drive pacsd.audit directly (no DICOM daemon needed); the daemon's own records are
checked in test_audit_daemon.py.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from pacsd import audit, config
from pacsd.audit import atna, chain
from pacsd.audit.events import Event, Outcome
from pacsd.audit.sequencer import SPOOL_FILE, Sequencer
from tests.rsyslog_fixture import PKI, Rsyslog, parse_rfc5424

TEST_PASSWORD = "Correct-Horse-Battery-9417"
TEST_TOTP = "914273"


@pytest.fixture
def node_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="pa-") as d:  # short: the audit socket lives here
        yield Path(d)


def make_cfg(node: Path, rs: Rsyslog, kind: str, **keys: Any) -> config.Config:
    audit_keys: dict[str, Any] = {"syslog": rs.url(kind), "spool": str(node / "spool"), **keys}
    if kind == "tls":
        audit_keys.setdefault("syslog_ca", str(rs.pki.ca))
        audit_keys.setdefault("syslog_cert", str(rs.pki.client_cert))
        audit_keys.setdefault("syslog_key", str(rs.pki.client_key))
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in audit_keys.items())
    text = f'[node]\nae_title = "PACSD_T"\n[audit]\n{body}\n'
    (node / "pacsd.toml").write_text(text)
    return config.load(node / "pacsd.toml")


def pacsd_lines(rs: Rsyslog, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    lines = rs.wait_lines(n, timeout)
    assert len(lines) >= n, f"expected {n} lines, got {len(lines)}"
    return [parse_rfc5424(line) for line in lines]


def emit_sample(big: bool) -> None:
    uids = [f"1.2.826.0.1.3680043.2.1000.{i}" for i in range(1500)] if big else []
    with audit.association(assoc_id="c0ffee" * 5 + "00", source_ip="127.0.0.1",
                           calling_ae="MODALITY1", called_ae="PACSD_T"):
        audit.record(Event.ASSOC_ACCEPTED)
        audit.record(Event.DICOM_STORE, study_uid="1.2.826.0.1.3680043.2.1", instances=3,
                     bytes=123_456, study_uids=uids)
    audit.record(Event.ASSOC_REJECTED, Outcome.SERIOUS, source_ip="127.0.0.2",
                 calling_ae="ROGUE", gate="ae_title", reason="calling AE not registered")


@pytest.mark.parametrize("kind", ["udp", "tcp", "tls", "unix"])
def test_records_arrive_as_rfc5424_json(kind: str, rsyslog: Rsyslog, node_dir: Path) -> None:
    seq = audit.start_sequencer(make_cfg(node_dir, rsyslog, kind))
    try:
        emit_sample(big=kind in ("tcp", "tls"))
        assert seq.flush(10)
    finally:
        audit.shutdown(5)
    accepted, store, rejected = pacsd_lines(rsyslog, 3)
    for p in (accepted, store, rejected):
        assert p["app"] == "pacsd" and p["facility"] == 10  # authpriv
        assert p["msgid"] == p["body"]["event"]
    assert store["msgid"] == "dicom.store" and store["severity"] == 6
    body = store["body"]
    assert body["calling_ae"] == "MODALITY1" and body["source_ip"] == "127.0.0.1"
    assert body["instances"] == 3 and body["bytes"] == 123_456 and body["seq"] == 2
    assert body["assoc_id"] == accepted["body"]["assoc_id"]
    if kind in ("tcp", "tls"):  # a message over 32 KiB arrives whole over a stream
        assert len(json.dumps(body)) > 32 * 1024 and len(body["study_uids"]) == 1500
    assert rejected["msgid"] == "assoc.rejected" and rejected["severity"] == 3
    assert rejected["body"]["gate"] == "ae_title" and rejected["body"]["outcome"] == 8
    assert audit.verify_file(rsyslog.log) == 0


def test_tls_refuses_a_collector_it_cannot_verify(rsyslog: Rsyslog, node_dir: Path) -> None:
    cfg = make_cfg(node_dir, rsyslog, "tls", syslog_ca=str(rsyslog.pki.other_ca))
    seq = Sequencer(cfg, listen=False)
    try:
        seq.submit({"ts": "2026-01-01T00:00:00.000000Z", "event": "app.start", "outcome": 0})
        assert not seq.flush(1.5)
    finally:
        seq.shutdown(5)
    assert seq.sent == 0 and seq.spooled == 1
    assert rsyslog.lines() == []


@pytest.mark.parametrize("kind", ["tcp", "tls"])
def test_outage_spools_then_everything_arrives_once_in_order(
        kind: str, rsyslog: Rsyslog, node_dir: Path) -> None:
    seq = audit.start_sequencer(make_cfg(node_dir, rsyslog, kind))
    seq._retry_max = 1.0  # reconnect promptly once rsyslog is back
    try:
        for i in range(10):
            audit.record(Event.DICOM_STORE, n=i)
        assert seq.flush(10)
        rsyslog.wait_lines(10)
        rsyslog.stop()
        timings = []
        for i in range(10, 510):
            t0 = time.perf_counter()
            audit.record(Event.DICOM_STORE, study_uid=f"1.2.3.{i}", n=i, instances=1, bytes=512)
            timings.append(time.perf_counter() - t0)
        deadline = time.monotonic() + 10
        while seq.spooled < 500 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seq.spooled >= 500
        spool_file = node_dir / "spool" / SPOOL_FILE
        assert spool_file.stat().st_size > 0
        rsyslog.start()
        assert seq.flush(30), "spool not replayed after rsyslog came back"
    finally:
        audit.shutdown(5)
    parsed = pacsd_lines(rsyslog, 510)
    assert len(parsed) == 510
    assert [p["body"]["seq"] for p in parsed] == list(range(1, 511))
    assert [p["body"]["n"] for p in parsed] == list(range(510))
    # record() never waited for the collector: it only queues
    print(f"record() while syslog down: median {statistics.median(timings) * 1e6:.0f} us, "
          f"max {max(timings) * 1e3:.2f} ms, total {sum(timings) * 1e3:.1f} ms for 500")
    assert sum(timings) < 0.5 and statistics.median(timings) < 0.001
    r = subprocess.run([sys.executable, "-m", "pacsd", "audit", "verify", str(rsyslog.log)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK: 510 records" in r.stdout


def test_cli_names_a_deleted_or_edited_line(rsyslog: Rsyslog, node_dir: Path,
                                            tmp_path: Path) -> None:
    seq = audit.start_sequencer(make_cfg(node_dir, rsyslog, "tcp"))
    try:
        for i in range(20):
            audit.record(Event.DICOM_QUERY, level="STUDY", n=i)
        assert seq.flush(10)
    finally:
        audit.shutdown(5)
    lines = rsyslog.wait_lines(20)
    assert len(lines) == 20

    def verify(text_lines: list[str]) -> subprocess.CompletedProcess[str]:
        f = tmp_path / "copy.log"
        f.write_text("\n".join(text_lines) + "\n")
        return subprocess.run([sys.executable, "-m", "pacsd", "audit", "verify", str(f)],
                              capture_output=True, text=True, timeout=60)

    r = verify(lines)
    assert r.returncode == 0, r.stdout
    r = verify(lines[:6] + lines[7:])  # delete line 7 (seq 7)
    assert r.returncode == 1 and "line 7:" in r.stdout and "seq 7 missing" in r.stdout
    edited = list(lines)
    edited[11] = edited[11].replace('"n":11', '"n":12')
    r = verify(edited)
    assert r.returncode == 1 and "line 12:" in r.stdout and "seq 12 altered" in r.stdout
    r = subprocess.run([sys.executable, "-m", "pacsd", "audit", "verify",
                        str(tmp_path / "nope.log")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "nope.log" in r.stderr and "Traceback" not in r.stderr


def test_atna_over_tls_validates_against_the_schema(rsyslog: Rsyslog, node_dir: Path) -> None:
    seq = audit.start_sequencer(make_cfg(node_dir, rsyslog, "tls", format="atna"))
    try:
        emit_sample(big=False)
        audit.record(Event.INTEGRITY_FAILURE, Outcome.SERIOUS, study_uid="1.2.3",
                     sha256="ab" * 32)
        assert seq.flush(10)
    finally:
        audit.shutdown(5)
    parsed = pacsd_lines(rsyslog, 5)  # 4 records and the alert the integrity failure raised
    schema = etree.RelaxNG(etree.parse(str(atna.schema_path())))
    ids = []
    for p in parsed:
        assert p["app"] == "pacsd" and p["sd"].startswith('[pacsd@32473 seq="')
        doc = etree.fromstring(p["msg"].encode())
        assert schema.validate(doc), (schema.error_log, p["msg"])
        ids.append(doc.find("EventIdentification/EventID").get("csd-code"))
    assert ids == ["110113", "110104", "110113", "110113", "110113"]
    assert [p["msgid"] for p in parsed][-1] == "alert.anomaly"
    assert audit.verify_file(rsyslog.log) == 0


def test_no_secret_reaches_the_file_or_spool(rsyslog: Rsyslog, rsyslog_pki: PKI,
                                            node_dir: Path) -> None:
    seq = audit.start_sequencer(make_cfg(node_dir, rsyslog, "tls"))
    key_pem = rsyslog_pki.client_key.read_text()
    try:
        for name, value in (("password", TEST_PASSWORD), ("passcode", TEST_PASSWORD + TEST_TOTP),
                            ("totp_code", TEST_TOTP), ("private_key", key_pem),
                            ("note", key_pem)):
            with pytest.raises(ValueError):
                audit.record(Event.AUTH_FAILURE, Outcome.SERIOUS, user="alice", **{name: value})
        audit.record(Event.AUTH_FAILURE, Outcome.SERIOUS, user="alice", reason="bad_password")
        assert seq.flush(10)
        rsyslog.stop()  # and some records through the spool
        audit.record(Event.AUTH_LOCKOUT, Outcome.SERIOUS, user="alice")
        time.sleep(0.5)
    finally:
        audit.shutdown(5)
    key_body = "".join(key_pem.splitlines()[1:-1])
    everything = rsyslog.log.read_bytes() + b"".join(
        p.read_bytes() for p in (node_dir / "spool").iterdir() if p.is_file())
    assert b"auth.lockout" in everything and b"bad_password" in everything
    for secret in (TEST_PASSWORD, TEST_TOTP, key_body[:40], "PRIVATE KEY"):
        assert secret.encode() not in everything, secret


def test_chain_persists_across_a_sequencer_restart(rsyslog: Rsyslog, node_dir: Path) -> None:
    cfg = make_cfg(node_dir, rsyslog, "udp")
    for round_ in range(3):
        seq = audit.start_sequencer(cfg)
        audit.record(Event.APP_START, round=round_)
        audit.record(Event.APP_STOP, round=round_)
        assert seq.flush(10)
        audit.shutdown(5)
    parsed = pacsd_lines(rsyslog, 6)
    assert [p["body"]["seq"] for p in parsed] == [1, 2, 3, 4, 5, 6]
    assert chain.load_state(node_dir / "spool").seq == 6
    assert audit.verify_file(rsyslog.log) == 0


WORKER = """
import sys
from pacsd import audit
audit.connect_worker(sys.argv[1])
with audit.association(assoc_id=sys.argv[2], source_ip="127.0.0.9", calling_ae="W"):
    for i in range(200):
        audit.record(audit.Event.DICOM_STORE, study_uid="1.2." + str(i), instances=1, n=i)
audit.shutdown(10)
"""


def test_workers_forward_to_the_sequencer_across_processes(rsyslog: Rsyslog,
                                                           node_dir: Path) -> None:
    seq = audit.start_sequencer(make_cfg(node_dir, rsyslog, "tcp"))
    try:
        procs = [subprocess.Popen([sys.executable, "-c", WORKER, seq.socket_path, f"w{k}"])
                 for k in range(2)]
        for p in procs:
            assert p.wait(60) == 0
        deadline = time.monotonic() + 10
        while seq.state[0] < 400 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seq.flush(10)
    finally:
        audit.shutdown(5)
    parsed = pacsd_lines(rsyslog, 400)
    assert [p["body"]["seq"] for p in parsed] == list(range(1, 401))
    for worker in ("w0", "w1"):  # each worker's records keep their own order
        ns = [p["body"]["n"] for p in parsed if p["body"]["assoc_id"] == worker]
        assert ns == list(range(200))
    assert audit.verify_file(rsyslog.log) == 0
