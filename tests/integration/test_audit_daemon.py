"""The real daemon's audit trail into a real rsyslog over TLS: C-STORE, a refused
association, admin changes and start/stop land in one verifiable chain; a syslog outage
neither slows ingest nor loses a record."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid

from tests.conftest import Client, Node, dcmtk_path, make_dataset, needs_dcmtk
from tests.rsyslog_fixture import Rsyslog, parse_rfc5424

pytestmark = needs_dcmtk


def tls_node(node_factory: Any, rs: Rsyslog) -> Node:
    return node_factory(**{  # type: ignore[no-any-return]
        "audit.syslog": rs.url("tls"),
        "audit.syslog_ca": str(rs.pki.ca),
        "audit.syslog_cert": str(rs.pki.client_cert),
        "audit.syslog_key": str(rs.pki.client_key),
    })


def storescu(node: Node, client: Client, files: list[str]) -> subprocess.CompletedProcess[str]:
    """storescu takes the files after peer and port (Node.dcmtk puts arguments before them)."""
    cmd = [dcmtk_path("storescu"), *node.tls_args(client), "-aet", client.title,
           "-aec", node.ae_title, "127.0.0.1", str(node.port), *files]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"})


def records(rs: Rsyslog, pred: Any, timeout: float = 20.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = [p["body"] for p in map(parse_rfc5424, rs.lines()) if pred(p["body"])]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def verify(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pacsd", "audit", "verify", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_store_rejection_admin_and_lifecycle_form_one_chain(
        node_factory: Any, rsyslog: Rsyslog, tmp_path: Path) -> None:
    node = tls_node(node_factory, rsyslog)
    mod = node.add_client("MOD1")  # `pacsd ae add` forwards admin.ae to the running sequencer
    study = generate_uid()
    files = [make_dataset(tmp_path / f"i{i}.dcm", study_uid=study) for i in range(3)]
    r = storescu(node, mod, [str(f) for f in files])
    assert r.returncode == 0, r.stderr
    rogue = node.add_client("ROGUE", register=False)
    r = storescu(node, rogue, [str(files[0])])
    assert r.returncode != 0

    stores = records(rsyslog, lambda b: b["event"] == "dicom.store")
    assert len(stores) == 1
    store = stores[0]
    assert store["study_uid"] == study and store["instances"] == 3 and store["outcome"] == 0
    assert store["calling_ae"] == "MOD1" and store["source_ip"] == "127.0.0.1"
    assert store["bytes"] > 0 and len(store["assoc_id"]) >= 32
    rejected = records(rsyslog, lambda b: b["event"] == "assoc.rejected")
    assert rejected and rejected[0]["calling_ae"] == "ROGUE"
    assert rejected[0]["gate"] == "calling_ae" and rejected[0]["outcome"] == 8
    admin = records(rsyslog, lambda b: b["event"] == "admin.ae")
    assert [a["target_ae"] for a in admin] == ["MOD1"]

    assert node.stop() == 0
    assert records(rsyslog, lambda b: b["event"] == "app.stop")
    events = [p["body"]["event"] for p in map(parse_rfc5424, rsyslog.lines())]
    assert events[0] == "app.start"
    assert events.index("assoc.accepted") < events.index("dicom.store")
    r = verify(rsyslog.log)
    assert r.returncode == 0, r.stdout


def test_syslog_outage_does_not_slow_ingest_or_lose_records(
        node_factory: Any, rsyslog: Rsyslog, tmp_path: Path) -> None:
    node = tls_node(node_factory, rsyslog)
    mod = node.add_client("MOD1")
    studies = [generate_uid() for _ in range(5)]

    def batch(tag: str) -> list[str]:
        return [str(make_dataset(tmp_path / tag / f"{i}.dcm", study_uid=studies[i % 5],
                                 pixel_bytes=1024)) for i in range(250)]

    up_files, down_files = batch("up"), batch("down")
    t0 = time.monotonic()
    r = storescu(node, mod, up_files)
    up = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert len(records(rsyslog, lambda b: b["event"] == "dicom.store")) == 5

    rsyslog.stop()
    t0 = time.monotonic()
    r = storescu(node, mod, down_files)
    down = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    print(f"250 instances: {up:.2f} s with syslog up, {down:.2f} s with syslog down")
    assert down < up * 2 + 3  # loose: the machine is shared; a blocking audit path takes far longer

    rsyslog.start()
    deadline = time.monotonic() + 40
    while len(records(rsyslog, lambda b: b["event"] == "dicom.store", timeout=0)) < 10:
        assert time.monotonic() < deadline, "spooled records were not replayed"
        time.sleep(0.2)
    assert node.stop() == 0
    records(rsyslog, lambda b: b["event"] == "app.stop")
    bodies = [p["body"] for p in map(parse_rfc5424, rsyslog.lines())]
    seqs = [b["seq"] for b in bodies]
    assert seqs == list(range(1, len(seqs) + 1))  # once each, in order
    r = verify(rsyslog.log)
    assert r.returncode == 0, r.stdout
