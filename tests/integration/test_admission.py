"""Gates 1-3 of DESIGN §4 against the real daemon, driven by DCMTK echoscu and raw sockets."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import time
import warnings
from pathlib import Path

import pytest

from tests.conftest import Node, needs_dcmtk

pytestmark = needs_dcmtk


def echo_ok(node: Node, client: object, **kw: object) -> bool:
    r = node.dcmtk("echoscu", client, **kw)  # type: ignore[arg-type]
    return r.returncode == 0


def rejected(node: Node, gate: str) -> list[dict[str, object]]:
    return node.audit.wait_for(lambda r: r.get("event") == "assoc.rejected"
                               and r.get("gate") == gate)


def test_echo_with_registered_certificate(node: Node) -> None:
    mod = node.add_client("MOD1")
    r = node.dcmtk("echoscu", mod)
    assert r.returncode == 0, r.stderr
    acc = node.audit.wait_for(lambda r: r.get("event") == "assoc.accepted")
    assert acc and acc[0]["calling_ae"] == "MOD1" and len(acc[0]["assoc_id"]) == 32


def test_idle_connections_before_tls_do_not_delay_others(node: Node) -> None:
    mod = node.add_client("MOD1")
    idle = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(10)]
    try:
        t0 = time.monotonic()
        assert echo_ok(node, mod)
        assert time.monotonic() - t0 < 5.0
    finally:
        for s in idle:
            s.close()


def test_plain_tcp_is_refused(node: Node) -> None:
    mod = node.add_client("MOD1")
    r = node.dcmtk("echoscu", mod, tls=False, timeout=60)
    assert r.returncode != 0
    assert rejected(node, "tls")
    assert echo_ok(node, mod)


def test_tls_without_client_certificate_is_refused(node: Node) -> None:
    mod = node.add_client("MOD1")
    ctx = ssl.create_default_context(cafile=str(node.ca))
    ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", node.port)) as raw, \
            pytest.raises((ssl.SSLError, ConnectionError, OSError)), ctx.wrap_socket(raw) as s:
        s.sendall(b"\x01\x00")  # TLS 1.3: the refusal arrives on the first read/write
        if not s.recv(1):
            raise ConnectionError("closed")
    assert rejected(node, "tls")
    assert echo_ok(node, mod)


def test_certificate_from_another_ca_is_refused(node_factory: object, node: Node) -> None:
    other = node_factory(start=False)  # type: ignore[operator]
    stranger = other.add_client("MOD1", register=False)
    # Register MOD1 on our node with a cert from our CA, then present the foreign one.
    node.add_client("MOD1")
    r = node.dcmtk("echoscu", stranger)
    assert r.returncode != 0
    assert rejected(node, "tls")


def test_valid_certificate_bound_to_another_ae_is_refused(node: Node) -> None:
    node.add_client("MOD1")
    mod2 = node.add_client("MOD2")
    r = node.dcmtk("echoscu", mod2, calling="MOD1")
    assert r.returncode != 0
    assert rejected(node, "certificate")
    assert echo_ok(node, mod2)


def test_unregistered_calling_ae_is_refused(node: Node) -> None:
    ghost = node.add_client("GHOST", register=False)
    r = node.dcmtk("echoscu", ghost)
    assert r.returncode != 0
    recs = rejected(node, "calling_ae")
    assert recs and recs[0]["calling_ae"] == "GHOST"


def test_wrong_called_ae_is_refused(node: Node) -> None:
    mod = node.add_client("MOD1")
    r = node.dcmtk("echoscu", mod, called="NOTUS")
    assert r.returncode != 0
    assert rejected(node, "called_ae")


def test_disabled_ae_is_refused_and_enable_restores(node: Node) -> None:
    mod = node.add_client("MOD1")
    assert node.cli("ae", "disable", "MOD1").returncode == 0
    assert not echo_ok(node, mod)
    assert node.cli("ae", "enable", "MOD1").returncode == 0
    assert echo_ok(node, mod)


def test_source_outside_registered_range_is_refused(node: Node) -> None:
    mod = node.add_client("MOD1", extra=("--host", "10.9.9.0/24"))
    assert not echo_ok(node, mod)
    assert rejected(node, "source_range")


def test_tls_1_1_client_is_refused(node: Node) -> None:
    mod = node.add_client("MOD1")
    ctx = node.ssl_context(mod)
    with warnings.catch_warnings():  # TLS 1.1 is deprecated: that is the point of the test
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with contextlib.suppress(ssl.SSLError):
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", node.port)) as raw, \
            pytest.raises((ssl.SSLError, OSError)):
        ctx.wrap_socket(raw).close()
    assert rejected(node, "tls")
    assert echo_ok(node, mod)


def test_random_bytes_after_handshake_abort_only_that_association(node: Node) -> None:
    mod = node.add_client("MOD1")
    ctx = node.ssl_context(mod)
    with socket.create_connection(("127.0.0.1", node.port)) as raw, \
            ctx.wrap_socket(raw) as s:
        s.sendall(os.urandom(10_240))
        s.settimeout(20)
        try:
            while s.recv(4096):
                pass
        except (OSError, ssl.SSLError):
            pass
    assert echo_ok(node, mod)
    assert node.proc is not None and node.proc.poll() is None
    # the junk connection is no association to drain: stopping does not wait for it
    t0 = time.monotonic()
    assert node.stop() == 0
    assert time.monotonic() - t0 < 10


def test_association_cap_rejects_the_next_one(node_factory: object) -> None:
    n: Node = node_factory(**{"node.max_associations": 1})  # type: ignore[operator]
    mod = n.add_client("MOD1")
    from pynetdicom import AE

    ae = AE(ae_title="MOD1")
    ae.add_requested_context("1.2.840.10008.1.1")
    first = ae.associate("127.0.0.1", n.port, ae_title=n.ae_title,
                         tls_args=(n.ssl_context(mod), None))
    try:
        assert first.is_established
        assert not echo_ok(n, mod)
        assert rejected(n, "max_associations")
    finally:
        first.release()
    time.sleep(0.3)
    assert echo_ok(n, mod)


def test_config_typo_exits_2_with_one_line(tmp_path: Path, node_factory: object) -> None:
    n: Node = node_factory(start=False)  # type: ignore[operator]
    text = n.cfg_path.read_text().replace("max_associations", "max_asociations", 1)
    n.cfg_path.write_text(text)
    for cmd in (("check-config",), ("serve",)):
        r = n.cli(*cmd)
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "max_asociations" in lines[0], r.stderr
        assert "Traceback" not in r.stderr
