"""`pacsd backup` while the node ingests, `pacsd restore` into a new node, manifest checks."""

from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from pydicom import dcmread

from tests.conftest import Node, free_port, make_dataset, pacsd_cmd

CT = "1.2.840.10008.5.1.4.1.1.2"


def _uids(index: Path) -> set[str]:
    con = sqlite3.connect(index)
    try:
        return {r[0] for r in con.execute("SELECT sop_instance_uid FROM instance")}
    finally:
        con.close()


def _new_node_config(base: Path, syslog: str) -> Path:
    """`pacsd init` a second node directory (empty databases), auditing to `syslog`."""
    r = subprocess.run(pacsd_cmd("init", str(base), "--port", str(free_port())),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    cfg = base / "pacsd.toml"
    text = re.sub(r'(?m)^syslog = .*$', f'syslog = "{syslog}"', cfg.read_text(), count=1)
    cfg.write_text(text)
    return cfg


def test_backup_during_ingest_then_restore_and_verify(node: Node, tmp_path: Path) -> None:
    from pynetdicom import AE

    mod = node.add_client("MOD", permits="echo,store")
    datasets = [dcmread(make_dataset(tmp_path / "in" / f"{i}.dcm", patient_id=f"P{i % 7}"))
                for i in range(160)]
    acked: list[str] = []
    ae = AE(ae_title="MOD")
    ae.add_requested_context(CT, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title,
                         tls_args=(node.ssl_context(mod), None))
    assert assoc.is_established

    def send() -> None:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if status and status.Status == 0:
                acked.append(ds.SOPInstanceUID)
            time.sleep(0.01)
        assoc.release()

    sender = threading.Thread(target=send)
    sender.start()
    try:
        deadline = time.monotonic() + 60
        while len(acked) < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        before = set(acked)  # acknowledged before the backup began
        assert len(before) >= 40
        dest = tmp_path / "backup"
        r = node.cli("backup", str(dest))
        during = len(acked)
    finally:
        sender.join(120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "backup complete" in r.stdout
    assert during < len(datasets), "ingest had finished before the backup ran"
    manifest = (dest / "manifest.sha256").read_text().splitlines()
    assert any(line.endswith("  index.sqlite") for line in manifest)
    assert any(line.endswith("  users.sqlite") for line in manifest)
    assert (dest / "backup.json").exists()
    check = subprocess.run(["sha256sum", "--quiet", "-c", "manifest.sha256"], cwd=dest,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert (dest.stat().st_mode & 0o077) == 0
    rec = node.audit.wait_for(lambda r: r["event"] == "store.backup")
    assert rec and rec[0]["outcome"] == 0 and rec[0]["instances"] >= len(before)

    # the running node's own locations are not empty: refused, nothing touched
    r = node.cli("restore", str(dest))
    assert r.returncode == 2 and "stop it" in r.stderr, r.stderr

    # restore into a new, empty node, then verify it
    cfg2 = _new_node_config(tmp_path / "restored", f"unix://{node.audit.path}")
    r = subprocess.run(pacsd_cmd("--config", str(cfg2), "restore", str(dest)),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "restore complete" in r.stdout
    r = subprocess.run(pacsd_cmd("--config", str(cfg2), "verify", "--json"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    restored = _uids(tmp_path / "restored" / "data" / "index.sqlite")
    assert before <= restored
    assert restored <= set(acked)
    rec = node.audit.wait_for(lambda r: r["event"] == "store.restore" and r["outcome"] == 0)
    assert rec and rec[0]["instances"] >= len(before)
    # the restored node knows the registered AE (users.sqlite came along)
    r = subprocess.run(pacsd_cmd("--config", str(cfg2), "ae", "show", "MOD"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr

    # restoring again onto the now-filled node is refused
    r = subprocess.run(pacsd_cmd("--config", str(cfg2), "restore", str(dest)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "holds data" in r.stderr


def test_restore_refuses_a_damaged_backup_and_writes_nothing(node_factory: Any,
                                                            tmp_path: Path) -> None:
    n: Node = node_factory(start=False)
    files = [make_dataset(tmp_path / "in" / f"{i}.dcm") for i in range(3)]
    r = n.cli("import", *map(str, files))
    assert r.returncode == 0, r.stdout + r.stderr
    dest = tmp_path / "b"
    r = n.cli("backup", str(dest))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 objects" in r.stdout

    # backing up into a non-empty directory is refused
    r = n.cli("backup", str(dest))
    assert r.returncode == 2 and "not empty" in r.stderr

    # flip one byte of a (copied, so the live store is untouched) object
    damaged = tmp_path / "damaged"
    shutil.copytree(dest, damaged, copy_function=shutil.copyfile)
    obj = next((damaged / "objects").rglob("*.dcm"))
    data = bytearray(obj.read_bytes())
    data[-1] ^= 0xFF
    obj.write_bytes(bytes(data))
    cfg2 = _new_node_config(tmp_path / "r1", f"unix://{n.audit.path}")
    r = subprocess.run(pacsd_cmd("--config", str(cfg2), "restore", str(damaged)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "does not match its manifest" in r.stderr, r.stderr
    assert not list((tmp_path / "r1" / "data" / "objects").rglob("*.dcm"))
    assert not _uids(tmp_path / "r1" / "data" / "index.sqlite")

    # a manifest entry pointing outside the backup's layout is refused
    evil = tmp_path / "evil"
    shutil.copytree(dest, evil, copy_function=shutil.copyfile)
    with open(evil / "manifest.sha256", "a") as f:
        f.write("0" * 64 + "  ../../etc/passwd\n")
    r = subprocess.run(pacsd_cmd("--config", str(cfg2), "restore", str(evil)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "not a pacsd manifest entry" in r.stderr, r.stderr

    # an incomplete backup (no manifest) is refused
    (evil / "manifest.sha256").unlink()
    r = subprocess.run(pacsd_cmd("--config", str(cfg2), "restore", str(evil)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "not a complete pacsd backup" in r.stderr

    # the intact backup restores
    r = subprocess.run(pacsd_cmd("--config", str(cfg2), "restore", str(dest)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(_uids(tmp_path / "r1" / "data" / "index.sqlite")) == 3
