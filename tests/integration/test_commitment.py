"""Storage Commitment Push Model against the real daemon (issue 8).

pynetdicom plays the modality (no DCMTK tool speaks storage commitment); objects are
stored with DCMTK `storescu +tls`. The modality's certificate carries serverAuth and
clientAuth (one certificate for both directions), so the same registered AE can receive
the report on a new TLS association to its `--dest`.
"""

from __future__ import annotations

import hashlib
import ssl
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, MRImageStorage, generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacsd import tls
from tests.conftest import Client, Node, free_port, make_dataset, needs_dcmtk

pytestmark = needs_dcmtk

SC = "1.2.840.10008.1.20.1"
SC_INSTANCE = "1.2.840.10008.1.20.1.1"
FAST_RETRY = {"commitment.retry_interval": 1, "commitment.retry_max_interval": 2}


class Modality:
    """A registered modality AE: stores with storescu, asks with pynetdicom, and (when
    `listen()` was called) receives reports on its own TLS port, its --dest."""

    def __init__(self, node: Node, title: str = "MOD", permits: str = "echo,store,commit",
                 dest_port: int | None = None) -> None:
        self.node = node
        self.title = title
        self.port = dest_port or free_port()
        node.clients_dir.mkdir(parents=True, exist_ok=True)
        self.client = Client(title, node.clients_dir / f"{title}.pem",
                             node.clients_dir / f"{title}.key")
        tls.issue(node.dir / "tls", title, self.client.cert, self.client.key, server=True,
                  hosts=("127.0.0.1", "localhost"))
        r = node.cli("ae", "add", title, "--cert", str(self.client.cert), "--permit", permits,
                     "--dest", f"127.0.0.1:{self.port}")
        assert r.returncode == 0, r.stderr
        self.reports: list[tuple[int, Dataset, str]] = []  # (event type, info, "same"/"new")
        self._cond = threading.Condition()
        self.server: Any = None

    # ---- receiving reports
    def on_report(self, event: Any, how: str) -> tuple[int, None]:
        info = event.event_information
        with self._cond:
            self.reports.append((int(event.event_type), info, how))
            self._cond.notify_all()
        return 0x0000, None

    def wait_report(self, timeout: float = 30) -> tuple[int, Dataset, str]:
        with self._cond:
            assert self._cond.wait_for(lambda: self.reports, timeout), "no report arrived"
            return self.reports[0]

    def listen(self) -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.node.ca))
        ctx.load_cert_chain(str(self.client.cert), str(self.client.key))
        ctx.verify_mode = ssl.CERT_REQUIRED
        ae = AE(ae_title=self.title)
        ae.add_supported_context(SC, scu_role=True, scp_role=True)
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, ssl_context=ctx,
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, self.on_report, ["new"])])

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    # ---- storing and asking
    def store(self, files: list[Path]) -> None:
        r = self.node.dcmtk("storescu", self.client, files=files)
        assert r.returncode == 0, r.stderr

    def associate(self, *, roles: bool = True) -> Any:
        ae = AE(ae_title=self.title)
        ae.dimse_timeout = 60
        ae.add_requested_context(SC)
        ae.add_requested_context(Verification)
        ext = [build_role(SC, scu_role=True, scp_role=True)] if roles else None
        a = ae.associate("127.0.0.1", self.node.port, ae_title=self.node.ae_title,
                         tls_args=(self.node.ssl_context(self.client), None), ext_neg=ext,
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, self.on_report, ["same"])])
        assert a.is_established
        return a

    def request(self, assoc: Any, refs: list[tuple[str, str]], txn: str | None = None
                ) -> tuple[int, str]:
        ds = Dataset()
        ds.TransactionUID = txn or generate_uid()
        ds.ReferencedSOPSequence = Sequence([_ref(c, i) for c, i in refs])
        st, _ = assoc.send_n_action(ds, 1, SC, SC_INSTANCE)
        return int(st.Status), str(ds.TransactionUID)


def _ref(cls_uid: str, inst_uid: str) -> Dataset:
    d = Dataset()
    d.ReferencedSOPClassUID = cls_uid
    d.ReferencedSOPInstanceUID = inst_uid
    return d


def _files(tmp: Path, n: int) -> list[Path]:
    study = generate_uid()
    series = generate_uid()
    return [make_dataset(tmp / f"i{k}.dcm", study_uid=study, series_uid=series,
                         InstanceNumber=k + 1) for k in range(n)]


def _refs(files: list[Path]) -> list[tuple[str, str]]:
    out = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        out.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    return out


def _committed(info: Dataset) -> set[str]:
    return {str(d.ReferencedSOPInstanceUID) for d in info.get("ReferencedSOPSequence", [])}


def _failed(info: Dataset) -> dict[str, int]:
    return {str(d.ReferencedSOPInstanceUID): int(d.FailureReason)
            for d in info.get("FailedSOPSequence", [])}


def _commit_records(node: Node, action: str, timeout: float = 10) -> list[dict[str, Any]]:
    return node.audit.wait_for(
        lambda r: r.get("event") == "dicom.commit" and r.get("action") == action, timeout)


@pytest.fixture
def modality(node: Node) -> Any:
    m = Modality(node)
    yield m
    m.close()


# ---------------------------------------------------------------------------- the cases
def test_commit_stored_missing_and_wrong_class(modality: Modality, tmp_path: Path) -> None:
    """50 stored + 2 never sent + 1 with a wrong SOP Class: 50 committed, 3 failed."""
    files = _files(tmp_path / "src", 51)
    modality.store(files)
    refs = _refs(files)
    missing = [(CTImageStorage, generate_uid()) for _ in range(2)]
    wrong = (MRImageStorage, refs[50][1])  # stored, as CT
    a = modality.associate()
    try:
        code, txn = modality.request(a, refs[:50] + missing + [wrong])
        assert code == 0
        event_type, info, how = modality.wait_report()
    finally:
        a.release()
    assert how == "same"
    assert event_type == 2
    assert str(info.TransactionUID) == txn
    assert _committed(info) == {i for _, i in refs[:50]}
    assert _failed(info) == {missing[0][1]: 0x0112, missing[1][1]: 0x0112, refs[50][1]: 0x0119}
    failed_classes = {str(d.ReferencedSOPInstanceUID): str(d.ReferencedSOPClassUID)
                      for d in info.FailedSOPSequence}
    assert failed_classes[refs[50][1]] == MRImageStorage  # as the modality named it
    rec = _commit_records(modality.node, "report")
    assert rec and (rec[0]["committed"], rec[0]["failed"], rec[0]["route"]) == (50, 3, "same")
    assert rec[0]["failure_reasons"] == ["0112:2", "0119:1"]
    req = _commit_records(modality.node, "request")
    assert req and req[0]["instances"] == 53 and req[0]["calling_ae"] == "MOD"


def test_all_committed_is_event_type_1_and_duplicate_transaction_fails_0131(
        modality: Modality, tmp_path: Path) -> None:
    files = _files(tmp_path / "src", 3)
    modality.store(files)
    refs = _refs(files)
    a = modality.associate(roles=False)  # no role selection: same association still works
    try:
        code, txn = modality.request(a, refs)
        assert code == 0
        event_type, info, _ = modality.wait_report()
        assert event_type == 1 and _committed(info) == {i for _, i in refs}
        assert "FailedSOPSequence" not in info
        code, _ = modality.request(a, refs, txn=txn)  # the same Transaction UID again
        assert code == 0
        deadline = time.monotonic() + 20
        while len(modality.reports) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        a.release()
    assert len(modality.reports) == 2
    event_type, info, _ = modality.reports[1]
    assert event_type == 2 and set(_failed(info).values()) == {0x0131}
    assert len(_failed(info)) == 3


def test_corrupted_object_fails_0110_and_alerts(modality: Modality, tmp_path: Path) -> None:
    files = _files(tmp_path / "src", 2)
    modality.store(files)
    refs = _refs(files)
    victim_uid = refs[1][1]
    victim = next(f for f in modality.node.objects.rglob("*.dcm")
                  if ".tmp" not in f.parts and pydicom.dcmread(f).SOPInstanceUID == victim_uid)
    raw = bytearray(victim.read_bytes())
    raw[-10] ^= 0xFF
    victim.write_bytes(bytes(raw))
    assert hashlib.sha256(raw).hexdigest() != victim.stem
    a = modality.associate()
    try:
        assert modality.request(a, refs)[0] == 0
        event_type, info, _ = modality.wait_report()
    finally:
        a.release()
    assert event_type == 2
    assert _committed(info) == {refs[0][1]}
    assert _failed(info) == {victim_uid: 0x0110}
    rec = modality.node.audit.wait_for(lambda r: r.get("event") == "integrity.failure")
    assert rec and rec[0]["sop_instance_uid"] == victim_uid and rec[0]["during"] == "commit"
    assert rec[0]["outcome"] == 12


def test_release_after_n_action_reports_on_new_tls_association(
        modality: Modality, tmp_path: Path) -> None:
    files = _files(tmp_path / "src", 4)
    modality.store(files)
    modality.listen()
    a = modality.associate()
    code, txn = modality.request(a, _refs(files))
    a.release()  # at once: the report cannot come on this association
    assert code == 0
    event_type, info, how = modality.wait_report()
    assert (event_type, how, str(info.TransactionUID)) == (1, "new", txn)
    assert len(_committed(info)) == 4
    rec = _commit_records(modality.node, "report")
    assert rec and rec[0]["route"] == "new"
    assert rec[0]["destination"] == f"127.0.0.1:{modality.port}"


def test_policy_new_and_destination_down_then_up(node_factory: Any, tmp_path: Path) -> None:
    node = node_factory(**{"commitment.report_on": "new", **FAST_RETRY})
    m = Modality(node)
    try:
        files = _files(tmp_path / "src", 2)
        m.store(files)
        a = m.associate()
        try:
            assert m.request(a, _refs(files))[0] == 0
            assert _commit_records(node, "delivery_failed", timeout=20), "no failed attempt"
        finally:
            a.release()
        assert not m.reports  # policy "new": never on the requesting association
        m.listen()
        event_type, _, how = m.wait_report(timeout=30)
        assert (event_type, how) == (1, "new")
        rec = _commit_records(node, "report")
        assert rec and rec[0]["attempts"] >= 2
    finally:
        m.close()


def test_kill_9_between_request_and_report(node_factory: Any, tmp_path: Path) -> None:
    node = node_factory(**{"commitment.report_on": "new", **FAST_RETRY})
    m = Modality(node)
    try:
        files = _files(tmp_path / "src", 2)
        m.store(files)
        a = m.associate()
        try:
            code, txn = m.request(a, _refs(files))
            assert code == 0
        finally:
            a.release()
        assert _commit_records(node, "delivery_failed", timeout=20)
        node.kill()
        m.listen()
        time.sleep(1.5)
        assert not m.reports  # nobody is left to send it ...
        node.start()  # ... until the node is back
        event_type, info, how = m.wait_report(timeout=30)
        assert (event_type, how, str(info.TransactionUID)) == (1, "new", txn)
    finally:
        m.close()


def test_expired_report_is_audited_as_failed(node_factory: Any, tmp_path: Path) -> None:
    node = node_factory(**{"commitment.report_on": "new", "commitment.retry_deadline": 2,
                           **FAST_RETRY})
    m = Modality(node)  # never listens
    files = _files(tmp_path / "src", 1)
    m.store(files)
    a = m.associate()
    try:
        assert m.request(a, _refs(files))[0] == 0
    finally:
        a.release()
    rec = _commit_records(node, "expired", timeout=20)
    assert rec and rec[0]["outcome"] == 8 and rec[0]["attempts"] >= 1


def test_without_commit_permission_refused(node: Node, tmp_path: Path) -> None:
    m = Modality(node, title="NOCOMMIT", permits="echo,store")
    a = m.associate()
    try:
        assert m.request(a, [(CTImageStorage, generate_uid())])[0] == 0x0124
        assert a.send_c_echo().Status == 0
    finally:
        a.release()
    rec = node.audit.wait_for(lambda r: r.get("event") == "assoc.rejected"
                              and r.get("gate") == "permission")
    assert rec and rec[0]["service"] == "commit"
    assert not m.reports


def _big_request(n: int) -> bytes:
    """Action Information with n Referenced SOP Sequence items, Implicit VR LE."""
    def el(group: int, elem: int, value: bytes) -> bytes:
        value += b"\0" * (len(value) % 2)
        return struct.pack("<HHI", group, elem, len(value)) + value

    cls = el(0x0008, 0x1150, CTImageStorage.encode())
    items = []
    for k in range(n):
        body = cls + el(0x0008, 0x1155, f"1.2.3.{k}".encode())
        items.append(struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body)
    return (el(0x0008, 0x1195, generate_uid().encode())
            + struct.pack("<HHI", 0x0008, 0x1199, 0xFFFFFFFF) + b"".join(items)
            + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))


@pytest.mark.filterwarnings("ignore::UserWarning")  # the modality's pydicom warns on bad UIDs
def test_malformed_n_actions_get_errors_and_node_keeps_serving(
        node_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each refused with a status. (The 100,000-item request is 6 MB: with the default
    [node] max_request_kb = 4096 the association would be aborted before it is decoded;
    raised here so that the request reaches the commitment cap.)"""
    import pynetdicom.association

    modality = Modality(node_factory(**{"node.max_request_kb": 16384}))
    big_bytes = _big_request(100_000)
    encode = pynetdicom.association.encode
    monkeypatch.setattr(pynetdicom.association, "encode", lambda ds, *a, **kw: (
        big_bytes if getattr(ds, "is_big", False) else encode(ds, *a, **kw)))
    good = (CTImageStorage, generate_uid())
    a = modality.associate()
    try:
        no_seq = Dataset()
        no_seq.TransactionUID = generate_uid()
        st, _ = a.send_n_action(no_seq, 1, SC, SC_INSTANCE)
        assert st.Status == 0x0115, st

        no_txn = Dataset()
        no_txn.ReferencedSOPSequence = Sequence([_ref(*good)])
        st, _ = a.send_n_action(no_txn, 1, SC, SC_INSTANCE)
        assert st.Status == 0x0115, st

        assert modality.request(a, [(CTImageStorage, "1.2.abc")])[0] == 0x0115
        assert modality.request(a, [(CTImageStorage, "1." + "2" * 300)])[0] == 0x0115
        assert modality.request(a, [(CTImageStorage, "")])[0] == 0x0115
        assert modality.request(a, [], txn=generate_uid())[0] == 0x0115

        st, _ = a.send_n_action(no_seq, 2, SC, SC_INSTANCE)  # no such action
        assert st.Status == 0x0123, st
        st, _ = a.send_n_action(no_seq, 1, SC, "1.2.3")  # not the well-known instance
        assert st.Status == 0x0117, st

        big = Dataset()  # 100,000 items, encoded by hand: pydicom takes ~a minute
        big.is_big = True
        st, _ = a.send_n_action(big, 1, SC, SC_INSTANCE)
        assert st.Status == 0x0213, st
        assert a.send_c_echo().Status == 0  # this association still works
    finally:
        a.release()
    b = modality.associate()  # and so does a new one
    try:
        assert b.send_c_echo().Status == 0
    finally:
        b.release()
    assert not modality.reports
    rec = _commit_records(modality.node, "request")
    assert len(rec) >= 7 and all(r["outcome"] == 4 for r in rec)


def test_two_workers_deliver_each_report_once(node_factory: Any, tmp_path: Path) -> None:
    """Several worker processes share the request table: every report goes out once."""
    node = node_factory(**{"node.workers": 2, "commitment.report_on": "new", **FAST_RETRY})
    m = Modality(node)
    try:
        files = _files(tmp_path / "src", 2)
        m.store(files)
        m.listen()
        txns = set()
        for _ in range(4):
            a = m.associate()
            try:
                code, txn = m.request(a, _refs(files))
                assert code == 0
                txns.add(txn)
            finally:
                a.release()
        deadline = time.monotonic() + 30
        while len(m.reports) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2 * FAST_RETRY["commitment.retry_max_interval"])  # any duplicate shows
        got = [str(info.TransactionUID) for _, info, _ in m.reports]
        assert sorted(got) == sorted(txns)
    finally:
        m.close()
