"""Daemon lifecycle: sd_notify, reload (SIGHUP and watched files), SIGTERM drain."""

from __future__ import annotations

import shutil
import signal
import socket
import sqlite3
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from pacsd import tls
from tests.conftest import DatagramCollector, Node, make_dataset, needs_dcmtk

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


class NotifySocket(DatagramCollector):
    """A datagram socket standing in for systemd's NOTIFY_SOCKET; keeps every message."""

    def __init__(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="pacsd-notify-"))
        super().__init__(self._dir / "notify")

    def wait_for(self, prefix: str, count: int = 1, timeout: float = 30) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [m for m in self.messages if m.startswith(prefix)]
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"no {count}x {prefix!r} in {self.messages}")

    def close(self) -> None:
        super().close()
        shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture
def notify(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    ns = NotifySocket()
    monkeypatch.setenv("NOTIFY_SOCKET", str(ns.path))
    monkeypatch.setenv("WATCHDOG_USEC", "600000")  # ping every 0.3 s
    yield ns
    ns.close()


def _kinds(messages: list[str]) -> list[str]:
    return [m.split("\n", 1)[0].split("=", 1)[0] for m in messages]


@needs_dcmtk
def test_notify_ready_watchdog_reloading_stopping_in_order(node_factory: Any,
                                                           notify: NotifySocket,
                                                           tmp_path: Path) -> None:
    n: Node = node_factory()
    ready = notify.wait_for("READY=1")[0]
    assert "MAINPID=" in ready and "STATUS=serving PACSD on" in ready
    assert "0 associations" in ready and "0 objects stored" in ready
    notify.wait_for("WATCHDOG=1", count=2)

    mod = n.add_client("MOD")
    r = n.dcmtk("storescu", mod, files=[make_dataset(tmp_path / "a.dcm")])
    assert r.returncode == 0, r.stderr

    # a held association shows in the live STATUS= figures (slots locked by the worker)
    assoc = _associate(n, "MOD", n.ssl_context(mod))
    try:
        deadline = time.monotonic() + 20
        while not any("STATUS=" in m and ": 1 association," in m for m in notify.messages):
            assert time.monotonic() < deadline, notify.messages[-3:]
            time.sleep(0.2)
    finally:
        assoc.release()

    n.proc.send_signal(signal.SIGHUP)
    notify.wait_for("RELOADING=1")
    second = notify.wait_for("READY=1", count=2)[1]
    assert "1 objects stored (1 since start)" in second and "1 reload" in second
    notify.wait_for("WATCHDOG=1", count=notify.messages.count("WATCHDOG=1") + 1)

    assert n.stop(timeout=30) == 0
    kinds = _kinds(notify.messages)
    assert kinds[0] == "READY", kinds  # nothing (not even WATCHDOG) before READY
    first_reload = kinds.index("RELOADING")
    assert "WATCHDOG" in kinds[1:first_reload]
    assert kinds[first_reload + 1:].count("READY") == 1
    assert kinds[-1] == "STOPPING", kinds
    assert "WATCHDOG" in kinds[first_reload:-1]
    reloading = next(m for m in notify.messages if m.startswith("RELOADING=1"))
    assert "MONOTONIC_USEC=" in reloading


def _ae(client_ctx: ssl.SSLContext, n: Node, contexts: tuple[str, ...] = (CT,)) -> Any:
    from pynetdicom import AE

    ae = AE(ae_title="X")
    for cx in contexts:
        ae.add_requested_context(cx, EXPLICIT_LE)
    ae.add_requested_context("1.2.840.10008.1.1")
    return ae


def _associate(n: Node, title: str, ctx: ssl.SSLContext) -> Any:
    ae = _ae(ctx, n)
    ae.ae_title = title
    assoc = ae.associate("127.0.0.1", n.port, ae_title=n.ae_title, tls_args=(ctx, None))
    assert assoc.is_established, f"association of {title} not established"
    return assoc


def _server_cert_sha256(n: Node, ctx: ssl.SSLContext) -> str:
    with socket.create_connection(("127.0.0.1", n.port), timeout=10) as raw, \
            ctx.wrap_socket(raw) as s:
        der = s.getpeercert(binary_form=True)
        assert der
        return tls.fingerprint_der(der)


def _client_ctx(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _replace(src: Path, dst: Path) -> None:
    """Replace a file the way a careful sysadmin does: write beside it, rename over it."""
    tmp = dst.with_name(dst.name + ".new")
    shutil.copyfile(src, tmp)
    tmp.chmod(dst.stat().st_mode & 0o777)
    tmp.replace(dst)


def test_reload_new_certificates_while_an_old_association_completes(node_factory: Any,
                                                                    tmp_path: Path) -> None:
    n: Node = node_factory(**{"node.shutdown_grace": 1})  # a reload is not bounded by it
    old = n.add_client("OLD")
    old_ctx = n.ssl_context(old)
    old_server = _server_cert_sha256(n, old_ctx)

    # a new PKI: CA, server certificate, and a client of the new CA registered as NEW
    pki = tmp_path / "newpki"
    pki.mkdir()
    tls.create_ca(pki)
    new_server = tls.issue(pki, "PACSD", pki / "server.pem", pki / "server.key", server=True,
                           hosts=tls.server_hosts())
    tls.issue(pki, "NEW", pki / "NEW.pem", pki / "NEW.key", server=False)
    r = n.cli("ae", "add", "NEW", "--cert", str(pki / "NEW.pem"), "--permit", "echo,store")
    assert r.returncode == 0, r.stderr

    assoc = _associate(n, "OLD", old_ctx)  # opened before the reload
    try:
        first = make_dataset(tmp_path / "before.dcm")
        assert assoc.send_c_store(dcmread(first)).Status == 0

        for name in ("server.pem", "server.key", "ca.pem"):
            _replace(pki / name, n.dir / "tls" / name)
        recs = n.audit.wait_for(lambda r: r["event"] == "config.reload", timeout=40)
        assert recs and recs[0]["outcome"] == 0 and recs[0]["trigger"] == "file_change", recs

        # the old association finishes its transfer on the old worker, past shutdown_grace
        time.sleep(2.5)
        sent = [make_dataset(tmp_path / f"after{i}.dcm") for i in range(5)]
        for p in sent:
            status = assoc.send_c_store(dcmread(p))
            assert status.Status == 0
    finally:
        assoc.release()
    assert not assoc.is_established

    # new associations see the new certificate and trust the new CA only
    new_ctx = _client_ctx(pki / "ca.pem", pki / "NEW.pem", pki / "NEW.key")
    assert _server_cert_sha256(n, new_ctx) == new_server.sha256 != old_server
    fresh = _associate(n, "NEW", new_ctx)
    try:
        assert fresh.send_c_echo().Status == 0
    finally:
        fresh.release()
    with pytest.raises((ssl.SSLError, OSError)):
        _server_cert_sha256(n, old_ctx)  # old client's CA no longer trusted either way

    con = sqlite3.connect(n.dir / "data" / "index.sqlite")
    count = con.execute("SELECT count(*) FROM instance WHERE calling_ae = 'OLD'").fetchone()[0]
    con.close()
    assert count == 6


@needs_dcmtk
def test_broken_config_is_refused_and_the_old_one_keeps_serving(node: Node,
                                                               tmp_path: Path) -> None:
    mod = node.add_client("MOD")
    good = node.cfg_path.read_text()
    node.cfg_path.write_text(good.replace("[node]\n", "[node]\nmax_assocations = 4\n", 1))
    recs = node.audit.wait_for(lambda r: r["event"] == "config.reload", timeout=30)
    assert recs and recs[0]["outcome"] == 8 and recs[0]["trigger"] == "file_change"
    assert "max_assocations" in recs[0]["error"]
    pids = node.pids()

    node.proc.send_signal(signal.SIGHUP)  # an explicit reload is refused the same way
    recs = node.audit.wait_for(lambda r: r["event"] == "config.reload"
                               and r.get("trigger") == "sighup")
    assert recs and recs[0]["outcome"] == 8
    assert node.pids() == pids  # no worker was restarted
    r = node.dcmtk("storescu", mod, files=[make_dataset(tmp_path / "a.dcm")])
    assert r.returncode == 0, r.stderr
    assert "reload refused" in node.log_text()

    # a certificate that does not match its key is refused too
    key = node.dir / "tls" / "server.key"
    good_key = key.read_bytes()
    tls.issue(node.dir / "tls", "OTHER", tmp_path / "o.pem", tmp_path / "o.key", server=True)
    node.cfg_path.write_text(good)
    _replace(tmp_path / "o.key", key)
    recs = node.audit.wait_for(lambda r: r["event"] == "config.reload" and r["outcome"] == 8
                               and "server.key" in r.get("error", ""),
                               timeout=30)
    assert recs, node.audit.records()
    r = node.dcmtk("echoscu", mod)
    assert r.returncode == 0, r.stderr
    key.write_bytes(good_key)


def test_sigterm_during_a_200_instance_transfer(node_factory: Any, tmp_path: Path) -> None:
    grace = 3
    n: Node = node_factory(**{"node.shutdown_grace": grace})
    mod = n.add_client("MOD")
    study = "1.2.826.0.1.3680043.8.498.1"
    datasets = [dcmread(make_dataset(tmp_path / f"{i}.dcm", study_uid=study, pixel_bytes=4096))
                for i in range(200)]
    acked: list[str] = []
    errors: list[BaseException] = []
    assoc = _associate(n, "MOD", n.ssl_context(mod))

    def send() -> None:
        try:
            for ds in datasets:
                if not assoc.is_established:
                    return
                status = assoc.send_c_store(ds)
                if status and status.Status == 0:
                    acked.append(ds.SOPInstanceUID)
                time.sleep(0.03)  # 200 instances take longer than the grace period
        except BaseException as exc:
            errors.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    deadline = time.monotonic() + 60
    while len(acked) < 30 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(acked) >= 30
    assert n.proc is not None
    t0 = time.monotonic()
    n.proc.send_signal(signal.SIGTERM)
    code = n.proc.wait(grace + 15)
    took = time.monotonic() - t0
    sender.join(30)
    assert code == 0
    assert took < grace + 5, f"exit took {took:.1f} s with shutdown_grace={grace}"
    assert not errors, errors
    assert 30 <= len(acked) < 200  # the transfer was cut at the end of the grace period

    r = n.cli("verify")
    assert r.returncode == 0, r.stdout + r.stderr
    con = sqlite3.connect(n.dir / "data" / "index.sqlite")
    stored = {row[0] for row in con.execute("SELECT sop_instance_uid FROM instance")}
    con.close()
    assert set(acked) <= stored
    assert not list((n.objects / ".tmp").iterdir()), "partial object left behind"
    stop = n.audit.wait_for(lambda r: r["event"] == "app.stop")
    assert stop

