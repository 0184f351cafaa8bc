"""Hostile peers against the real daemon (issue 9): idle and slow clients, resource limits,
garbage after the TLS handshake. Each test also checks the node keeps serving others.

Timeouts are shortened in the config so each test runs in seconds, not minutes.
"""

from __future__ import annotations

import os
import selectors
import socket
import ssl
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fuzz import pdu
from tests.conftest import Client, Node, make_dataset, needs_dcmtk, stored_files

pytestmark = needs_dcmtk

FAST = {"node.acse_timeout": 3, "node.network_timeout": 4, "node.dimse_timeout": 5}


# ---------------------------------------------------------------------------- helpers

def worker_pid(node: Node) -> int:
    assert node.proc is not None
    workers = [p for p in node.pids() if p != node.proc.pid]
    assert len(workers) == 1, workers
    return workers[0]


def fd_count(pid: int) -> int:
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def wait_fds(pid: int, baseline: int, timeout: float = 15.0) -> int:
    """Wait until the worker's descriptor count is back to `baseline` (or the deadline)."""
    deadline = time.monotonic() + timeout
    n = fd_count(pid)
    while n > baseline and time.monotonic() < deadline:
        time.sleep(0.2)
        n = fd_count(pid)
    return n


def tls_connect(node: Node, client: Client, timeout: float = 10.0) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", node.port), timeout=timeout)
    return node.ssl_context(client).wrap_socket(raw)


def associate(node: Node, client: Client,
              contexts: Any = ((1, pdu.VERIFICATION, (pdu.IMPLICIT_LE,)),),
              **kw: Any) -> ssl.SSLSocket:
    """TLS + A-ASSOCIATE-RQ; asserts an A-ASSOCIATE-AC came back."""
    s = tls_connect(node, client)
    s.sendall(pdu.associate_rq(client.title, node.ae_title, contexts, **kw))
    got = pdu.read_pdu(s)
    assert got is not None and got[0] == 0x02, got
    return s


def closed_within(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the peer closes or aborts (reads and discards data), None if not."""
    start = time.monotonic()
    sock.settimeout(0.5)
    while time.monotonic() - start < timeout:
        try:
            data = sock.recv(65536)
        except (TimeoutError, ssl.SSLWantReadError):
            continue
        except OSError:
            return time.monotonic() - start
        if not data:
            return time.monotonic() - start
        if data[:1] == b"\x07":  # A-ABORT: the node gave up on us
            return time.monotonic() - start
    return None


def store_ok(node: Node, client: Client, files: list[Path], timeout: float = 60) -> float:
    t0 = time.monotonic()
    r = node.dcmtk("storescu", client, files=files, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return time.monotonic() - t0


def echo_ok(node: Node, client: Client) -> None:
    r = node.dcmtk("echoscu", client, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------------- idle / slow


def test_idle_and_slow_clients_are_closed_and_others_served(node_factory: Any,
                                                            tmp_path: Path) -> None:
    """200 TCP connections that never start TLS, 50 that finish TLS and never associate and
    one trickling a C-STORE at 1 byte/s: a normal store still runs promptly, each idle one
    is closed at its timeout and the worker's descriptors return to baseline."""
    node = node_factory(**FAST)
    modality = node.add_client("MOD")
    slow = node.add_client("SLOW")
    pid = worker_pid(node)
    files = [make_dataset(tmp_path / f"{i}.dcm", patient_id=f"P{i}") for i in range(5)]
    store_ok(node, modality, files[:1])  # warm up: imports, first DB connections
    baseline = fd_count(pid)
    baseline_rss = rss_kb(pid)

    # the trickler: association, C-STORE command, then its dataset at one byte a second
    trick = associate(node, slow, ((1, pdu.CT_IMAGE, (pdu.EXPLICIT_LE,)),))
    trick.sendall(pdu.p_data(pdu.pdv(1, 0x03, pdu.c_store_rq(1, "1.2.3.4"))))
    payload = os.urandom(200)
    trick.sendall(struct.pack(">BBL", 0x04, 0, len(payload) + 6) +
                  struct.pack(">LBB", len(payload) + 2, 1, 0x02))
    stop = threading.Event()
    trick_closed: list[float] = []
    t_trick = time.monotonic()

    def trickle() -> None:
        for b in payload:
            if stop.wait(1.0):
                return
            try:
                trick.send(bytes([b]))
            except OSError:
                trick_closed.append(time.monotonic() - t_trick)
                return

    tt = threading.Thread(target=trickle, daemon=True)
    tt.start()

    sel = selectors.DefaultSelector()
    opened: dict[socket.socket, tuple[str, float]] = {}
    for _ in range(200):
        s = socket.create_connection(("127.0.0.1", node.port), timeout=10)
        s.setblocking(False)
        opened[s] = ("tcp", time.monotonic())
    ctx = node.ssl_context(slow)
    for _ in range(50):
        raw = socket.create_connection(("127.0.0.1", node.port), timeout=10)
        s = ctx.wrap_socket(raw)
        s.setblocking(False)
        opened[s] = ("tls", time.monotonic())
    for s in opened:
        sel.register(s, selectors.EVENT_READ)

    # meanwhile a normal modality stores at full speed
    took = store_ok(node, modality, files[1:])
    assert took < 10, f"a normal store took {took:.1f}s while idle clients were connected"

    closed: dict[str, list[float]] = {"tcp": [], "tls": []}
    deadline = time.monotonic() + 20
    while opened and time.monotonic() < deadline:
        for key, _ in sel.select(0.5):
            s = key.fileobj
            kind, t0 = opened[s]  # type: ignore[index]
            try:
                data = s.recv(4096)  # type: ignore[union-attr]
            except (ssl.SSLWantReadError, BlockingIOError):
                continue
            except OSError:
                data = b""
            if data:
                continue
            closed[kind].append(time.monotonic() - t0)
            sel.unregister(s)
            s.close()  # type: ignore[union-attr]
            del opened[s]  # type: ignore[arg-type]
    leftover = len(opened)
    for s in opened:
        s.close()
    assert leftover == 0, f"{leftover} idle connections still open after 20 s"
    # acse_timeout = 3: the handshake deadline for TCP, ARTIM for TLS without A-ASSOCIATE-RQ
    assert len(closed["tcp"]) == 200 and max(closed["tcp"]) < 3 + 6, closed["tcp"]
    assert min(closed["tcp"]) > 2, closed["tcp"]
    assert len(closed["tls"]) == 50 and max(closed["tls"]) < 3 + 6, closed["tls"]

    # the trickler: one PDU must arrive within network_timeout (4 s), not byte by byte forever
    waited = closed_within(trick, 15)
    stop.set()
    tt.join(5)
    trick.close()
    assert waited is not None, "a 1 byte/s C-STORE was still held open after 15 s"
    assert time.monotonic() - t_trick < 4 + 8

    n = wait_fds(pid, baseline)
    assert n <= baseline, f"worker fds {n} > baseline {baseline}"
    assert rss_kb(pid) < baseline_rss + 64 * 1024
    assert len(stored_files(node)) == 5
    # the node still answers
    echo_ok(node, modality)


def test_stalled_pdu_is_closed_at_network_timeout(node_factory: Any) -> None:
    """A PDU header then silence: the worker's reader must not block forever."""
    node = node_factory(**FAST)
    c = node.add_client("STALL")
    s = associate(node, c)
    s.sendall(struct.pack(">BBL", 0x04, 0, 1000) + b"\0\0\0")
    waited = closed_within(s, 15)
    s.close()
    assert waited is not None and waited < 4 + 6, waited
    echo_ok(node, c)


def test_trickled_tls_handshake_is_closed_at_acse_timeout(node_factory: Any) -> None:
    """A ClientHello sent a byte at a time must not outlast acse_timeout as a whole."""
    node = node_factory(**FAST)
    c = node.add_client("TRICKLE")
    hello = bytes.fromhex("16030100") + os.urandom(40)  # a TLS record header, then noise
    s = socket.create_connection(("127.0.0.1", node.port), timeout=10)
    t0 = time.monotonic()
    closed_at = None
    for b in hello:
        try:
            s.send(bytes([b]))
        except OSError:
            closed_at = time.monotonic() - t0
            break
        time.sleep(0.5)
        s.settimeout(0.01)
        try:
            if s.recv(100) == b"":
                closed_at = time.monotonic() - t0
                break
        except TimeoutError:
            pass
        except OSError:
            closed_at = time.monotonic() - t0
            break
    s.close()
    assert closed_at is not None and closed_at < 3 + 3, closed_at
    echo_ok(node, c)


@pytest.mark.parametrize("pdu_type", [0x01, 0x04])
def test_absurd_pdu_length_is_refused_without_allocating(node_factory: Any,
                                                         pdu_type: int) -> None:
    """A header announcing a 4 GiB PDU (an A-ASSOCIATE-RQ before association, a P-DATA
    after it) closes the connection at once; the worker does not allocate it."""
    node = node_factory(**FAST)
    c = node.add_client("BIG")
    pid = worker_pid(node)
    echo_ok(node, c)
    rss0 = rss_kb(pid)
    s = associate(node, c) if pdu_type == 0x04 else tls_connect(node, c)
    s.sendall(struct.pack(">BBL", pdu_type, 0, 0xFFFFFFF0) + b"\0" * 64)
    waited = closed_within(s, 10)
    s.close()
    assert waited is not None and waited < 2, waited
    assert rss_kb(pid) < rss0 + 32 * 1024
    echo_ok(node, c)


def test_pdata_above_max_pdu_size_is_refused(node_factory: Any) -> None:
    """[node] max_pdu_size is what we advertise; a peer that ignores it is cut off."""
    node = node_factory(**{**FAST, "node.max_pdu_size": 16384})
    c = node.add_client("FAT")
    s = associate(node, c, ((1, pdu.CT_IMAGE, (pdu.EXPLICIT_LE,)),))
    s.sendall(pdu.p_data(pdu.pdv(1, 0x03, pdu.c_store_rq(1, "1.2.3.4"))))
    big = pdu.p_data(pdu.pdv(1, 0x00, b"\0" * 20000))
    s.sendall(big)
    waited = closed_within(s, 10)
    s.close()
    assert waited is not None and waited < 2, waited
    echo_ok(node, c)
    assert stored_files(node) == []
