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


def net_fd_count(pid: int) -> int:
    """Descriptors other than SQLite files: sockets, pipes (wake-up pipes of DUL threads),
    spool files. SQLite connections close up to dbutil.IDLE_CLOSE after their last use
    (their return to the baseline after a burst is test_load_fds.py's subject), so they
    are not counted here: this is about idle peers' connections being closed."""
    n = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = str(fd.readlink())
        except OSError:
            continue
        if ".sqlite" not in target:
            n += 1
    return n


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def wait_fds(pid: int, baseline: int, timeout: float = 15.0) -> int:
    """Wait until the worker's non-SQLite descriptor count is back to `baseline`."""
    deadline = time.monotonic() + timeout
    n = net_fd_count(pid)
    while n > baseline and time.monotonic() < deadline:
        time.sleep(0.2)
        n = net_fd_count(pid)
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


def store_ok(node: Node, client: Client, files: list[Path], *args: str,
             timeout: float = 60) -> float:
    t0 = time.monotonic()
    r = node.dcmtk("storescu", client, *args, files=files, timeout=timeout)
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
    baseline = net_fd_count(pid)
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
    left = sorted(str(f.readlink()) for f in Path(f"/proc/{pid}/fd").iterdir())
    assert n <= baseline, f"worker socket/pipe/file fds {n} > baseline {baseline}: {left}"
    # the trickled C-STORE's spool file is gone with its association
    assert not [p for p in left if "spool-" in p], left
    assert list((node.objects / ".tmp").iterdir()) == []
    # 250 connection threads leave glibc malloc arenas behind (not returned to the OS):
    # seen 81 -> 160 MB; the bound is what matters (a 4 GiB PDU header: +32 MB, below)
    assert rss_kb(pid) < baseline_rss + 160 * 1024
    assert len(stored_files(node)) == 5
    # the node still answers
    echo_ok(node, modality)


LIMITS = {**FAST, "node.max_pdu_size": 16384, "node.max_contexts": 4,
          "node.max_request_kb": 64, "query.max_suboperations": 2}


def rejected(node: Node, gate: str) -> list[dict[str, Any]]:
    return node.audit.wait_for(lambda r: r.get("event") == "assoc.rejected"
                               and r.get("gate") == gate, timeout=5)


def test_limits_cut_off_one_peer_and_others_keep_being_served(node_factory: Any,
                                                              tmp_path: Path) -> None:
    """One node, each hostile peer in turn; after each the node still answers an echo.

    Stalled PDU, trickled TLS handshake, 4 GiB PDU headers (before and after association),
    P-DATA above max_pdu_size, too many presentation contexts, an endless C-FIND
    identifier, a C-GET selecting more than max_suboperations."""
    node = node_factory(**LIMITS)
    c = node.add_client("HOSTILE", permits="echo,store,find,get")
    pid = worker_pid(node)
    echo_ok(node, c)
    rss0 = rss_kb(pid)

    # a PDU header, then silence: closed at network_timeout (4 s), not never
    s = associate(node, c)
    s.sendall(struct.pack(">BBL", 0x04, 0, 1000) + b"\0\0\0")
    waited = closed_within(s, 15)
    s.close()
    assert waited is not None and waited < 4 + 6, ("stalled PDU", waited)
    echo_ok(node, c)

    # a ClientHello a byte every 0.5 s: the whole handshake is bounded by acse_timeout (3 s)
    s = socket.create_connection(("127.0.0.1", node.port), timeout=10)
    t0 = time.monotonic()
    closed_at = None
    for b in bytes.fromhex("16030100") + os.urandom(40):
        try:
            s.send(bytes([b]))
            s.settimeout(0.5)
            if s.recv(100) == b"":
                closed_at = time.monotonic() - t0
                break
        except TimeoutError:
            continue
        except OSError:
            closed_at = time.monotonic() - t0
            break
    s.close()
    assert closed_at is not None and closed_at < 3 + 3, ("trickled handshake", closed_at)

    # 4 GiB announced: refused at once, nothing allocated
    for pdu_type in (0x01, 0x04):
        s = associate(node, c) if pdu_type == 0x04 else tls_connect(node, c)
        s.sendall(struct.pack(">BBL", pdu_type, 0, 0xFFFFFFF0) + b"\0" * 64)
        waited = closed_within(s, 10)
        s.close()
        assert waited is not None and waited < 2, ("4 GiB PDU", pdu_type, waited)
        echo_ok(node, c)
    assert rss_kb(pid) < rss0 + 32 * 1024
    assert rejected(node, "pdu_size")

    # P-DATA above the 16 KiB we advertised
    s = associate(node, c, ((1, pdu.CT_IMAGE, (pdu.EXPLICIT_LE,)),))
    s.sendall(pdu.p_data(pdu.pdv(1, 0x03, pdu.c_store_rq(1, "1.2.3.4"))))
    s.sendall(pdu.p_data(pdu.pdv(1, 0x00, b"\0" * 20000)))
    waited = closed_within(s, 10)
    s.close()
    assert waited is not None and waited < 2, ("P-DATA > max_pdu_size", waited)
    echo_ok(node, c)

    # five presentation contexts where four are allowed: A-ASSOCIATE-RJ, audited
    s = tls_connect(node, c)
    s.sendall(pdu.associate_rq(c.title, node.ae_title,
                               [(2 * i + 1, pdu.VERIFICATION, (pdu.IMPLICIT_LE,))
                                for i in range(5)]))
    got = pdu.read_pdu(s)
    s.close()
    assert got is not None and got[0] == 0x03, got
    assert rejected(node, "max_contexts")

    # every rejection reaches the peer as an A-ASSOCIATE-RJ inside TLS (it used to race the
    # close: a raw client saw it in ~40 % of tries, some in plaintext)
    answers = []
    for _ in range(20):
        s = tls_connect(node, c)
        s.sendall(pdu.associate_rq("NOBODY", node.ae_title))
        try:
            got = pdu.read_pdu(s, timeout=5)
            answers.append(got[0] if got else None)
        except ssl.SSLError as exc:
            answers.append(exc.reason)
        s.close()
    assert answers == [0x03] * 20, answers

    # a C-FIND identifier that never ends: aborted beyond max_request_kb (64), audited
    s = associate(node, c, ((1, pdu.STUDY_ROOT_FIND, (pdu.IMPLICIT_LE,)),))
    s.sendall(pdu.p_data(pdu.pdv(1, 0x03, pdu.c_find_rq(1))))
    chunk = pdu.p_data(pdu.pdv(1, 0x00, b"\x10\x00\x10\x00" + b"A" * 8000))
    sent = 0
    try:
        for _ in range(200):  # 1.6 MB if nobody stops us
            s.sendall(chunk)
            sent += 1
    except OSError:
        pass
    waited = closed_within(s, 10)
    s.close()
    assert waited is not None, "an endless C-FIND identifier was accepted"
    assert rejected(node, "max_request")
    echo_ok(node, c)

    # C-GET selecting three instances where two are allowed: A700, nothing sent
    files = [make_dataset(tmp_path / f"g{i}.dcm", study_uid="1.2.826.0.1.3680043.9.9.1",
                          series_uid="1.2.826.0.1.3680043.9.9.1.1",
                          sop_uid=f"1.2.826.0.1.3680043.9.9.1.1.{i + 1}") for i in range(3)]
    store_ok(node, c, files, "-R")  # only the contexts needed: max_contexts = 4
    final, received = cget_study(node, c, "1.2.826.0.1.3680043.9.9.1")
    assert final.Status == 0xA700 and received == 0, final
    assert "more than 2 instances" in str(final.get("ErrorComment", "")), final
    echo_ok(node, c)


def cget_study(node: Node, c: Client, study_uid: str) -> tuple[Any, int]:
    from pydicom.dataset import Dataset
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        CTImageStorage,
        StudyRootQueryRetrieveInformationModelGet,
    )

    got = []

    def on_store(event: Any) -> int:
        got.append(event.request.AffectedSOPInstanceUID)
        return 0

    ae = AE(ae_title=c.title)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    a = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title,
                     tls_args=(node.ssl_context(c), None),
                     ext_neg=[build_role(CTImageStorage, scp_role=True)],
                     evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert a.is_established
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    final = None
    try:
        for st, _ in a.send_c_get(ds, StudyRootQueryRetrieveInformationModelGet):
            if st and st.Status not in (0xFF00, 0xFF01):
                final = st
    finally:
        a.release()
    return final, len(got)


def test_wire_fuzz_slice_node_answers_or_closes_and_keeps_serving(tmp_path: Path) -> None:
    """16 mutated PDUs (seeded, reproducible) after the TLS handshake, 8 at a time: each
    is answered or closed within network_timeout + slack, the worker is the same process
    afterwards, an echo still works, and no thread died with a traceback."""
    from fuzz.targets import Stats
    from fuzz.wire import WireFuzzer, describe

    stats = Stats()
    w = WireFuzzer(tmp_path / "wire", stats, seed=9, parallel=8)
    try:
        w.run(seconds=60, count=16)
        log = w.node.log_text()
    finally:
        w.close()
    assert stats.executions >= 16, describe(w.outcomes)
    assert not stats.findings, stats.findings
    assert "Exception in thread" not in log, log[-3000:]
