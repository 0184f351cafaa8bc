"""The sequencer without rsyslog: spool and replay, alerts, drop accounting, worker link.

The collector here is a unix datagram socket the test binds itself (like /dev/log).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pacsd import audit, config
from pacsd.audit import chain
from pacsd.audit.events import Event, Outcome
from pacsd.audit.sequencer import (
    SPOOL_FILE,
    Sequencer,
    WorkerClient,
    socket_path_for,
    validate_forwarded,
)
from pacsd.errors import EnvironmentProblem


class Collector:
    """A datagram socket standing in for /dev/log."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.1)
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.lines.append(self.sock.recv(65536).decode())
            except (TimeoutError, OSError):
                continue

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line.split(" - ", 1)[1]) for line in self.lines]

    def wait(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.lines) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.records()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def short_tmp() -> Any:
    import tempfile
    with tempfile.TemporaryDirectory(prefix="pa-") as d:  # unix socket paths must be short
        yield Path(d)


def make_cfg(tmp: Path, **audit_keys: Any) -> config.Config:
    keys = {"syslog": f"unix://{tmp}/log.sock", "spool": str(tmp / "spool"), **audit_keys}
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in keys.items())
    return config.parse(f"[audit]\n{body}\n", tmp / "pacsd.toml")


def rec(event: Event, outcome: Outcome = Outcome.SUCCESS, **fields: Any) -> dict[str, Any]:
    return {"ts": "2026-01-01T00:00:00.000000Z", "event": event.value, "outcome": int(outcome),
            **fields}


def test_spool_while_down_then_replay_in_order(short_tmp: Path) -> None:
    cfg = make_cfg(short_tmp)
    seq = Sequencer(cfg, listen=False)
    for i in range(50):
        seq.submit(rec(Event.DICOM_STORE, n=i))
    assert not seq.flush(0.5)  # not deliverable
    seq.shutdown(10)
    assert seq.spooled == 50 and seq.sent == 0
    spool = (short_tmp / "spool" / SPOOL_FILE).read_text().splitlines()
    assert len(spool) == 50 and chain.check_lines(iter(spool))[0]

    collector = Collector(f"{short_tmp}/log.sock")
    try:
        seq = Sequencer(cfg, listen=False)
        for i in range(50, 55):
            seq.submit(rec(Event.DICOM_STORE, n=i))
        assert seq.flush(10)
        seq.shutdown(5)
        got = collector.wait(55)
    finally:
        collector.close()
    assert [r["seq"] for r in got] == list(range(1, 56))
    assert [r["n"] for r in got] == list(range(55))
    assert chain.check_lines(iter(collector.lines))[0]
    assert (short_tmp / "spool" / SPOOL_FILE).stat().st_size == 0
    assert chain.load_state(short_tmp / "spool").seq == 55


def test_failure_burst_and_integrity_failure_raise_alerts(short_tmp: Path) -> None:
    collector = Collector(f"{short_tmp}/log.sock")
    try:
        seq = Sequencer(make_cfg(short_tmp, alert_failures=3, alert_window=60), listen=False)
        for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.1", "192.0.2.2", "192.0.2.1"):
            seq.submit(rec(Event.ASSOC_REJECTED, Outcome.SERIOUS, source_ip=ip, gate="tls"))
        seq.submit(rec(Event.AUTH_FAILURE, Outcome.SERIOUS, source_ip="192.0.2.3"))
        seq.submit(rec(Event.INTEGRITY_FAILURE, Outcome.SERIOUS, sha256="ab" * 32,
                       study_uid="1.2.3"))
        assert seq.flush(10)
        seq.shutdown(5)
        got = collector.wait(9)
    finally:
        collector.close()
    alerts = [r for r in got if r["event"] == "alert.anomaly"]
    assert len(alerts) == 2, got
    burst, integrity = alerts
    assert burst["reason"] == "failure_burst" and burst["source_ip"] == "192.0.2.1"
    assert burst["count"] == 3 and burst["trigger_seq"] == 5
    assert integrity["reason"] == "integrity_failure" and integrity["sha256"] == "ab" * 32
    alert_lines = [line for line in collector.lines if " alert.anomaly " in line]
    assert all(line.startswith("<81>1 ") for line in alert_lines)  # authpriv.alert


class GatedSequencer(Sequencer):
    """Holds its thread until released, so the bounded queue fills deterministically."""

    gate: threading.Event
    entered: threading.Event

    def _process(self, batch: list[dict[str, Any]]) -> None:
        self.entered.set()
        self.gate.wait(20)
        super()._process(batch)


def test_full_queue_drops_without_blocking_and_audits_the_count(short_tmp: Path) -> None:
    collector = Collector(f"{short_tmp}/log.sock")
    GatedSequencer.gate = threading.Event()
    GatedSequencer.entered = threading.Event()
    try:
        seq = GatedSequencer(make_cfg(short_tmp, queue_size=100), listen=False)
        assert GatedSequencer.entered.wait(5)  # its thread now holds an (empty) batch
        t0 = time.perf_counter()
        for i in range(1000):
            seq.submit(rec(Event.DICOM_QUERY, n=i))
        elapsed = time.perf_counter() - t0
        assert seq.dropped == 900
        GatedSequencer.gate.set()
        assert seq.flush(10)
        seq.shutdown(5)
        got = collector.wait(1000 - seq.dropped + 1)
    finally:
        collector.close()
    assert elapsed < 1.0
    dropped = [r for r in got if r["event"] == "audit.dropped"]
    assert len(dropped) == 1 and dropped[0]["count"] == seq.dropped
    assert dropped[0]["outcome"] == 8
    assert chain.check_lines(iter(collector.lines))[0]


def test_one_chain_owner_per_spool(short_tmp: Path) -> None:
    cfg = make_cfg(short_tmp)
    first = Sequencer(cfg, listen=False)
    try:
        with pytest.raises(EnvironmentProblem, match="held by another"):
            Sequencer(cfg, listen=False, lock_timeout=0.3)
    finally:
        first.shutdown(2)
    Sequencer(cfg, listen=False, lock_timeout=0.3).shutdown(2)


def test_worker_client_forwards_to_listening_sequencer(short_tmp: Path) -> None:
    collector = Collector(f"{short_tmp}/log.sock")
    try:
        seq = Sequencer(make_cfg(short_tmp))
        assert seq.socket_path == str(short_tmp / "spool" / "audit.sock")
        assert oct(Path(seq.socket_path).stat().st_mode & 0o777) == "0o600"
        client = WorkerClient(seq.socket_path)
        for i in range(20):
            client.submit(rec(Event.DICOM_STORE, n=i, assoc_id="x"))
        client.submit({**rec(Event.DICOM_STORE), "password": "nope-nope"})  # refused there
        assert client.flush(5)
        client.shutdown(2)
        deadline = time.monotonic() + 5
        while seq._queue.unfinished_tasks or len(collector.lines) < 20:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        seq.shutdown(5)
        got = collector.records()
    finally:
        collector.close()
    assert [r["n"] for r in got] == list(range(20))
    assert not any("password" in line for line in collector.lines)
    assert not Path(seq.socket_path).exists()


def test_validate_forwarded() -> None:
    good = rec(Event.AUTH_LOGIN, user="alice")
    assert validate_forwarded(good)["user"] == "alice"
    for bad in ({**good, "totp_code": "123456"}, {**good, "seq": 3}, {**good, "event": "x"},
                {**good, "outcome": 5}, ["not", "a", "dict"]):
        with pytest.raises((ValueError, KeyError, TypeError)):
            validate_forwarded(bad)


def test_socket_path_falls_back_when_too_long(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 90)
    cfg = config.parse(f'[audit]\nspool = "{deep}/spool"\n', tmp_path / "pacsd.toml")
    p = socket_path_for(cfg)
    assert len(p) < 108 and f"pacsd-audit-{os.getuid()}" in p
    assert p == socket_path_for(cfg)  # stable: workers derive the same path


def test_standalone_sequences_locally_then_forwards_to_a_live_sequencer(short_tmp: Path) -> None:
    import subprocess
    import sys
    collector = Collector(f"{short_tmp}/log.sock")
    cfg = make_cfg(short_tmp)
    (short_tmp / "pacsd.toml").write_text(
        f'[audit]\nsyslog = "unix://{short_tmp}/log.sock"\nspool = "{short_tmp}/spool"\n')
    script = ("import sys; from pacsd import audit, config; "
              "s = audit.start_standalone(config.load(sys.argv[1])); print(type(s).__name__); "
              "audit.record(audit.Event.ADMIN_AE, action=sys.argv[2], target_ae='CT1'); "
              "audit.shutdown(5)")

    def one_shot(action: str) -> str:
        r = subprocess.run([sys.executable, "-c", script, str(short_tmp / "pacsd.toml"), action],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    try:
        assert one_shot("add") == "Sequencer"  # no daemon: sequences under the chain lock
        daemon_seq = audit.start_sequencer(cfg)
        assert one_shot("remove") == "WorkerClient"  # daemon up: forwards to it
        got = collector.wait(2)
        audit.shutdown(5)
        assert daemon_seq.state[0] == 2
    finally:
        collector.close()
    assert [(r["seq"], r["action"]) for r in got] == [(1, "add"), (2, "remove")]
    assert chain.check_lines(iter(collector.lines))[0]


def test_reconfigure_switches_target_and_replays_the_spool(short_tmp: Path) -> None:
    seq = Sequencer(make_cfg(short_tmp, syslog=f"unix://{short_tmp}/old.sock"), listen=False)
    collector = Collector(f"{short_tmp}/new.sock")
    try:
        seq.submit(rec(Event.APP_START))
        assert not seq.flush(0.5)  # old target is gone: spooled
        seq.reconfigure(make_cfg(short_tmp, syslog=f"unix://{short_tmp}/new.sock"))
        seq.submit(rec(Event.CONFIG_RELOAD))
        assert seq.flush(5)
        seq.shutdown(5)
        got = collector.wait(2)
    finally:
        collector.close()
    assert [(r["seq"], r["event"]) for r in got] == [(1, "app.start"), (2, "config.reload")]


def test_an_oversized_datagram_is_dropped_and_counted_not_stuck(short_tmp: Path) -> None:
    collector = Collector(f"{short_tmp}/log.sock")
    try:
        seq = Sequencer(make_cfg(short_tmp), listen=False)
        seq.submit(rec(Event.DICOM_STORE, uids=["1.2.3.4.5.6.7.8.9"] * 40_000))  # > 256 KiB
        seq.submit(rec(Event.DICOM_STORE, n=1))
        assert seq.flush(5)
        seq.shutdown(5)
        got = collector.wait(2)
    finally:
        collector.close()
    assert [(r["seq"], r["event"]) for r in got][:2] == [(2, "dicom.store"), (3, "audit.dropped")]
    assert got[1]["count"] == 1
