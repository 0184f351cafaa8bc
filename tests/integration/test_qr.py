"""Query/Retrieve end to end: findscu +tls and pynetdicom against the real daemon, DCMTK
dcmqrscp as the reference for C-FIND results, a real storescp +tls as C-MOVE destination.
"""

from __future__ import annotations

import hashlib
import io
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from pacsd import tls
from tests.conftest import Client, Node, dcmtk_path, free_port, make_dataset, needs_dcmtk

pytestmark = needs_dcmtk

# (patient id, name, study date, modality, instances) -- near misses on purpose
STUDIES = [
    ("P1", "DOE^JANE", "20240101", "CT", 2),
    ("P1", "DOE^JANE", "20240102", "MR", 1),
    ("P2", "DOE^JOHN", "20240101", "CT", 1),
    ("P3", "DOEL^JANE", "20231231", "CT", 1),
    ("P4", "Doe^Jane", "20240101", "MR", 1),
    ("P5", "DOE^JANET", "20240103", "CT", 1),
    ("P6", "SMITH^JANE", "20240104", "CT", 1),
]


def build_files(src: Path) -> list[Path]:
    files = []
    for n, (pid, name, date, mod, count) in enumerate(STUDIES):
        study, series = f"1.2.826.0.1.3680043.9.7.{n + 1}", f"1.2.826.0.1.3680043.9.7.{n + 1}.1"
        for i in range(count):
            files.append(make_dataset(
                src / f"s{n}_{i}.dcm", patient_id=pid, patient_name=name, study_uid=study,
                series_uid=series, sop_uid=f"{series}.{i + 1}", modality=mod,
                study_date=date, pixel_bytes=512, InstanceNumber=i + 1,
                AccessionNumber=f"ACC{n + 1}"))
    return files


class QRNode:
    """The node with data and the AEs these tests use."""

    def __init__(self, node: Node, tmp: Path) -> None:
        self.node = node
        self.tmp = tmp
        self.dest_port = free_port()
        self.mod = node.add_client("MOD", permits="echo,store")
        # a C-MOVE destination is a TLS server: its certificate needs serverAuth, which
        # `pacsd cert issue` (client certificates) does not give
        self.dest = Client("DEST", node.clients_dir / "DEST.pem", node.clients_dir / "DEST.key")
        node.clients_dir.mkdir(parents=True, exist_ok=True)
        tls.issue(node.dir / "tls", "DEST", self.dest.cert, self.dest.key, server=True)
        r = node.cli("ae", "add", "DEST", "--cert", str(self.dest.cert), "--permit", "echo",
                     "--dest", f"127.0.0.1:{self.dest_port}")
        assert r.returncode == 0, r.stderr
        self.other = node.add_client("OTHER", permits="echo",
                                     extra=("--dest", f"127.0.0.1:{free_port()}"))
        self.ws = node.add_client("WS", permits="echo,find,move,get",
                                  extra=("--move-to", "DEST"))
        self.files = build_files(tmp / "src")
        self.store(self.files)

    def store(self, files: list[Path]) -> None:
        node = self.node
        cmd = [dcmtk_path("storescu"), *node.tls_args(self.mod), "-aet", "MOD", "-aec",
               node.ae_title, "127.0.0.1", str(node.port), *map(str, files)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                           env={"TCP_NODELAY": "1"})
        assert r.returncode == 0, r.stderr

    def assoc(self, client: Client | None = None, contexts: list[Any] | None = None,
              roles: list[Any] | None = None) -> Any:
        c = client or self.ws
        ae = AE(ae_title=c.title)
        for cx in contexts or [StudyRootQueryRetrieveInformationModelFind,
                               PatientRootQueryRetrieveInformationModelFind,
                               StudyRootQueryRetrieveInformationModelMove, Verification]:
            ae.add_requested_context(cx)
        a = ae.associate("127.0.0.1", self.node.port, ae_title=self.node.ae_title,
                         tls_args=(self.node.ssl_context(c), None), ext_neg=roles)
        assert a.is_established
        return a


@pytest.fixture
def qr(node: Node, tmp_path: Path) -> QRNode:
    return QRNode(node, tmp_path)


def ident(level: str, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def cfind(assoc: Any, ds: Dataset, model: Any = StudyRootQueryRetrieveInformationModelFind
          ) -> tuple[list[Dataset], Dataset]:
    matches, final = [], Dataset()
    for st, found in assoc.send_c_find(ds, model):
        if st.Status in (0xFF00, 0xFF01):
            matches.append(found)
        else:
            final = st
    return matches, final


def findscu(node: Node, client: Client | None, out: Path, args: list[str], *,
            port: int | None = None, called: str | None = None) -> list[Dataset]:
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("*.dcm"):
        f.unlink()
    if client is None:  # the dcmqrscp reference: no TLS
        cmd = [dcmtk_path("findscu"), "-aet", "WS", "-aec", called or "QRSCP", "-X", "-od",
               str(out), *args, "127.0.0.1", str(port)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                           env={"TCP_NODELAY": "1"})
    else:
        r = node.dcmtk("findscu", client, "-X", "-od", str(out), *args)
    assert r.returncode == 0, r.stderr
    return [pydicom.dcmread(f) for f in sorted(out.glob("*.dcm"))]


@pytest.fixture
def dcmqrscp(qr: QRNode, tmp_path: Path) -> Iterator[int]:
    """DCMTK's own Q/R SCP on the same files (no TLS, another loopback port)."""
    db = tmp_path / "qrdb"
    db.mkdir()
    port = free_port()
    cfg = tmp_path / "dcmqrscp.cfg"
    cfg.write_text(
        f"NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 4\n"
        "HostTable BEGIN\nHostTable END\nVendorTable BEGIN\nVendorTable END\n"
        f"AETable BEGIN\nQRSCP {db} RW (100, 64mb) ANY\nAETable END\n")
    r = subprocess.run([dcmtk_path("dcmqridx"), str(db), *map(str, qr.files)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    proc = subprocess.Popen([dcmtk_path("dcmqrscp"), "-c", str(cfg), "-ll", "error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    yield port
    proc.terminate()
    proc.wait(10)


# ---------------------------------------------------------------- C-FIND vs dcmqrscp
FIND_CASES = [
    # (findscu model flag, level, keys, unique key compared)
    ("-S", "STUDY", ["PatientName=DOE^JANE"], "StudyInstanceUID"),
    ("-S", "STUDY", ["PatientName=DOE*"], "StudyInstanceUID"),
    ("-S", "STUDY", ["PatientName=*JANE"], "StudyInstanceUID"),
    ("-S", "STUDY", ["PatientName=D?E^JAN?"], "StudyInstanceUID"),
    ("-S", "STUDY", ["PatientName=Doe^Jane"], "StudyInstanceUID"),
    ("-S", "STUDY", ["StudyDate=20240101"], "StudyInstanceUID"),
    ("-S", "STUDY", ["StudyDate=20240101-20240102"], "StudyInstanceUID"),
    ("-S", "STUDY", ["StudyDate=20240103-"], "StudyInstanceUID"),
    ("-S", "STUDY", ["StudyDate=-20231231"], "StudyInstanceUID"),
    ("-S", "STUDY", ["PatientID=P1"], "StudyInstanceUID"),
    ("-S", "STUDY", ["AccessionNumber=ACC3"], "StudyInstanceUID"),
    ("-S", "STUDY", ["StudyInstanceUID=1.2.826.0.1.3680043.9.7.1\\1.2.826.0.1.3680043.9.7.6"],
     "StudyInstanceUID"),
    ("-S", "STUDY", ["PatientName", "StudyDate"], "StudyInstanceUID"),  # universal
    ("-S", "SERIES", ["StudyInstanceUID=1.2.826.0.1.3680043.9.7.1", "Modality"],
     "SeriesInstanceUID"),
    ("-S", "IMAGE", ["StudyInstanceUID=1.2.826.0.1.3680043.9.7.1",
                     "SeriesInstanceUID=1.2.826.0.1.3680043.9.7.1.1"], "SOPInstanceUID"),
    ("-P", "PATIENT", ["PatientName=DOE*"], "PatientID"),
    ("-P", "STUDY", ["PatientID=P1", "StudyDate=20240102"], "StudyInstanceUID"),
]


def _rows(results: list[Dataset], unique: str, keys: list[str]) -> list[tuple[str, ...]]:
    names = [k.split("=")[0] for k in keys]
    return sorted((str(r.get(unique, "")), *(str(r.get(n, "")) for n in names))
                  for r in results)


def test_cfind_matches_dcmqrscp(qr: QRNode, dcmqrscp: int, tmp_path: Path) -> None:
    for model, level, keys, unique in FIND_CASES:
        args = [model, "-k", f"QueryRetrieveLevel={level}", "-k", unique]
        for k in keys:
            args += ["-k", k]
        ours = findscu(qr.node, qr.ws, tmp_path / "ours", args)
        ref = findscu(qr.node, None, tmp_path / "ref", args, port=dcmqrscp)
        assert ref, (keys, "reference found nothing: the case tests nothing")
        assert _rows(ours, unique, keys) == _rows(ref, unique, keys), (level, keys)


def test_cfind_returns_requested_keys_and_computed_ones(qr: QRNode) -> None:
    a = qr.assoc()
    try:
        m, final = cfind(a, ident("STUDY", PatientID="P1", StudyDate="",
                                  NumberOfStudyRelatedInstances="", ModalitiesInStudy=""))
        assert final.Status == 0
        assert sorted((r.StudyDate, r.NumberOfStudyRelatedInstances) for r in m) == [
            ("20240101", 2), ("20240102", 1)]
        assert {e.keyword for e in m[0]} == {"QueryRetrieveLevel", "PatientID", "StudyDate",
                                             "NumberOfStudyRelatedInstances",
                                             "ModalitiesInStudy", "StudyInstanceUID"}
    finally:
        a.release()


def test_cfind_refusals_and_node_keeps_serving(qr: QRNode) -> None:
    a = qr.assoc(qr.mod)  # a modality AE may not query
    try:
        m, final = cfind(a, ident("STUDY", StudyInstanceUID=""))
        assert m == [] and final.Status == 0x0124
    finally:
        a.release()
    a = qr.assoc()
    try:
        no_level = Dataset()
        no_level.PatientID = "P1"
        _, final = cfind(a, no_level)
        assert final.Status == 0xA900  # QueryRetrieveLevel missing
        _, final = cfind(a, ident("PATIENT", PatientID="P1"))
        assert final.Status == 0xA900  # no PATIENT level in the study root model
        _, final = cfind(a, ident("STUDY", SOPInstanceUID=""))
        assert final.Status == 0xA900  # key below the level
        uids = "\\".join(f"1.2.3.{i}" for i in range(10_000))
        _, final = cfind(a, ident("STUDY", StudyInstanceUID=uids))
        assert final.Status == 0xA700
        m, final = cfind(a, ident("STUDY", PatientID="P2"))
        assert final.Status == 0 and len(m) == 1  # still serving
    finally:
        a.release()
    records = qr.node.audit.wait_for(lambda r: r.get("event") == "dicom.query"
                                     and r.get("outcome") == 8)
    assert records and records[0]["calling_ae"] == "MOD"


def test_cfind_max_results_is_stated(node_factory: Any, tmp_path: Path) -> None:
    node = node_factory(**{"query.max_results": 3})
    qr = QRNode(node, tmp_path)
    a = qr.assoc()
    try:
        m, final = cfind(a, ident("STUDY", StudyInstanceUID=""))
        assert len(m) == 3
        assert final.Status == 0xA700 and "max_results" in final.ErrorComment
    finally:
        a.release()


def test_cfind_specific_character_set(qr: QRNode, tmp_path: Path) -> None:
    f = make_dataset(tmp_path / "latin.dcm", patient_id="P9", patient_name="Müller^Jürgen",
                     SpecificCharacterSet="ISO_IR 100")
    qr.store([f])
    a = qr.assoc()
    try:
        for cs in ("ISO_IR 100", "ISO_IR 192"):
            q = ident("STUDY", StudyInstanceUID="", PatientName="Müller^J*")
            q.SpecificCharacterSet = cs
            m, final = cfind(a, q)
            assert final.Status == 0 and len(m) == 1, cs
            assert str(m[0].PatientName) == "Müller^Jürgen"
    finally:
        a.release()


# ---------------------------------------------------------------- C-MOVE
class StoreSCP:
    """DCMTK storescp +tls, the C-MOVE destination, presenting DEST's certificate."""

    def __init__(self, qr: QRNode, out: Path, port: int | None = None,
                 cert: Client | None = None) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        c = cert or qr.dest
        self.proc = subprocess.Popen(
            [dcmtk_path("storescp"), "+tls", str(c.key), str(c.cert), "+cf", str(qr.node.ca),
             "-aet", "DEST", "-od", str(out), "-uf", str(port or qr.dest_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={"TCP_NODELAY": "1"})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port or qr.dest_port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("storescp did not start")

    def files(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_file())

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def cmove(assoc: Any, ds: Dataset, dest: str = "DEST") -> tuple[list[Dataset], Dataset]:
    pending, final = [], Dataset()
    for st, _found in assoc.send_c_move(ds, dest, StudyRootQueryRetrieveInformationModelMove):
        if st.Status in (0xFF00, 0xFF01):
            pending.append(st)
        else:
            final = st
    return pending, final


def _check_progress(pending: list[Dataset], n: int) -> None:
    """Pending responses of an all-successful retrieve of `n` instances under the default
    pending_interval_ms: the first right after the first sub-operation, then any further
    ones with consistent, advancing counts (how many depends on the machine's speed)."""
    assert 1 <= len(pending) <= n
    assert pending[0].NumberOfCompletedSuboperations == 1
    done = [p.NumberOfCompletedSuboperations for p in pending]
    assert done == sorted(set(done))
    for p in pending:
        assert p.NumberOfRemainingSuboperations + p.NumberOfCompletedSuboperations == n
        assert p.NumberOfFailedSuboperations == p.NumberOfWarningSuboperations == 0


def _same_dataset(sent: Path, got: Path) -> None:
    a, b = pydicom.dcmread(sent), pydicom.dcmread(got)
    assert a == b
    assert a.file_meta.TransferSyntaxUID == b.file_meta.TransferSyntaxUID


def test_cmove_to_storescp_over_tls(qr: QRNode, tmp_path: Path) -> None:
    scp = StoreSCP(qr, tmp_path / "dest")
    a = qr.assoc()
    try:
        pending, final = cmove(a, ident("STUDY", StudyInstanceUID="1.2.826.0.1.3680043.9.7.1"))
        if final.Status != 0:
            scp.close()
            print(scp.proc.stderr.read().decode())  # type: ignore[union-attr]
            print(qr.node.log_text())
        assert final.Status == 0, final
        assert final.NumberOfCompletedSuboperations == 2
        assert final.NumberOfFailedSuboperations == 0
        _check_progress(pending, 2)
        got = {pydicom.dcmread(f).SOPInstanceUID: f for f in scp.files()}
        sent = {pydicom.dcmread(f).SOPInstanceUID: f for f in qr.files[:2]}
        assert got.keys() == sent.keys()
        for uid, f in sent.items():
            _same_dataset(f, got[uid])
    finally:
        a.release()
        scp.close()
    rec = qr.node.audit.wait_for(lambda r: r.get("event") == "dicom.retrieve")
    assert rec and rec[0]["destination"] == "DEST" and rec[0]["completed"] == 2
    assert rec[0]["bytes"] > 0 and rec[0]["outcome"] == 0


def test_cmove_refusals_and_dead_destination(qr: QRNode, tmp_path: Path) -> None:
    study = ident("STUDY", StudyInstanceUID="1.2.826.0.1.3680043.9.7.1")
    a = qr.assoc()
    try:
        _, final = cmove(a, study, dest="NOBODY")
        assert final.Status == 0xA801  # not registered
        _, final = cmove(a, study, dest="OTHER")
        assert final.Status == 0xA801  # registered, but not in WS's --move-to
        _, final = cmove(a, study)  # nobody listens on DEST's port
        assert final.Status == 0xA702
        assert final.NumberOfFailedSuboperations == 2
        _, final = cmove(a, ident("STUDY", StudyInstanceUID=""))
        assert final.Status == 0xA900  # never "move everything"
    finally:
        a.release()
    a = qr.assoc(qr.mod, contexts=[StudyRootQueryRetrieveInformationModelMove])
    try:
        _, final = cmove(a, study)
        assert final.Status == 0x0124
    finally:
        a.release()
    a = qr.assoc()  # still serving
    try:
        assert a.send_c_echo().Status == 0
    finally:
        a.release()


# ---------------------------------------------------------------- C-GET
def cget(qr: QRNode, ds: Dataset, ts: str = "1.2.840.10008.1.2.1"
         ) -> tuple[list[Dataset], Dataset, Dataset | None, list[Dataset]]:
    received: list[Dataset] = []

    def on_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0

    from pynetdicom import evt

    ae = AE(ae_title="WS")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for cx in (CTImageStorage, MRImageStorage):
        ae.add_requested_context(cx, ts)
    roles = [build_role(CTImageStorage, scp_role=True), build_role(MRImageStorage, scp_role=True)]
    a = ae.associate("127.0.0.1", qr.node.port, ae_title=qr.node.ae_title,
                     tls_args=(qr.node.ssl_context(qr.ws), None), ext_neg=roles,
                     evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert a.is_established
    pending, final, identifier = [], Dataset(), None
    try:
        for st, found in a.send_c_get(ds, StudyRootQueryRetrieveInformationModelGet):
            if st.Status in (0xFF00, 0xFF01):
                pending.append(st)
            else:
                final, identifier = st, found
    finally:
        a.release()
    return pending, final, identifier, received


def test_cget_with_role_selection(qr: QRNode) -> None:
    pending, final, _, received = cget(qr, ident(
        "STUDY", StudyInstanceUID="1.2.826.0.1.3680043.9.7.1"))
    assert final.Status == 0 and final.NumberOfCompletedSuboperations == 2
    _check_progress(pending, 2)
    sent = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in qr.files[:2]}
    assert {r.SOPInstanceUID for r in received} == sent.keys()
    for r in received:
        ref = sent[r.SOPInstanceUID]
        assert r == ref


def test_corrupted_object_not_sent_counted_and_audited(qr: QRNode) -> None:
    sop = "1.2.826.0.1.3680043.9.7.1.1.2"
    data = {pydicom.dcmread(f).SOPInstanceUID: f.read_bytes() for f in qr.files[:2]}
    victim = None
    for f in qr.node.objects.rglob("*.dcm"):
        if pydicom.dcmread(f).SOPInstanceUID == sop:
            victim = f
    assert victim is not None
    raw = bytearray(victim.read_bytes())
    raw[-10] ^= 0xFF  # one flipped bit in the pixel data
    victim.write_bytes(bytes(raw))
    assert hashlib.sha256(raw).hexdigest() != victim.stem
    _, final, identifier, received = cget(qr, ident(
        "STUDY", StudyInstanceUID="1.2.826.0.1.3680043.9.7.1"))
    assert [r.SOPInstanceUID for r in received] == ["1.2.826.0.1.3680043.9.7.1.1.1"]
    assert final.Status == 0xB000
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (1, 1)
    assert identifier is not None and identifier.FailedSOPInstanceUIDList == sop
    good = "1.2.826.0.1.3680043.9.7.1.1.1"
    assert received[0] == pydicom.dcmread(io.BytesIO(data[good]))  # the good one, intact
    rec = qr.node.audit.wait_for(lambda r: r.get("event") == "integrity.failure")
    assert rec and rec[0]["sop_instance_uid"] == sop


def test_cmove_destination_dies_midway(qr: QRNode) -> None:
    """A destination that aborts after the first object: exact counts, the rest failed."""
    import ssl

    from pynetdicom import evt

    stored: list[str] = []

    def on_store(event: Any) -> int:
        if stored:
            event.assoc.abort()
            return 0xA700
        stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(qr.node.ca))
    ctx.load_cert_chain(str(qr.dest.cert), str(qr.dest.key))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ae = AE(ae_title="DEST")
    ae.add_supported_context(CTImageStorage, "1.2.840.10008.1.2.1")
    server = ae.start_server(("127.0.0.1", qr.dest_port), block=False, ssl_context=ctx,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        a = qr.assoc()
        try:
            _, final = cmove(a, ident("STUDY", StudyInstanceUID="1.2.826.0.1.3680043.9.7.1"))
            assert final.Status == 0xB000, final
            assert (final.NumberOfCompletedSuboperations,
                    final.NumberOfFailedSuboperations) == (1, 1)
            assert stored == ["1.2.826.0.1.3680043.9.7.1.1.1"]
            assert a.send_c_echo().Status == 0  # the requester's association is unharmed
        finally:
            a.release()
    finally:
        server.shutdown()
    rec = qr.node.audit.wait_for(lambda r: r.get("event") == "dicom.retrieve")
    assert rec and (rec[0]["completed"], rec[0]["failed"], rec[0]["outcome"]) == (1, 1, 4)


def test_cmove_destination_with_another_certificate_gets_nothing(qr: QRNode,
                                                                 tmp_path: Path) -> None:
    """The destination's chain is valid, but it is not the certificate DEST registered."""
    tls_dir = qr.node.dir / "tls"
    imposter = Client("DEST", tls_dir / "server.pem", tls_dir / "server.key")
    scp = StoreSCP(qr, tmp_path / "dest", cert=imposter)
    a = qr.assoc()
    try:
        _, final = cmove(a, ident("STUDY", StudyInstanceUID="1.2.826.0.1.3680043.9.7.1"))
        assert final.Status == 0xA702
        assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (0, 2)
    finally:
        a.release()
        scp.close()
    assert scp.files() == []
    rec = qr.node.audit.wait_for(lambda r: r.get("event") == "assoc.rejected"
                                 and r.get("gate") == "move-dest")
    assert rec and rec[0]["destination"] == "DEST"


def test_cget_converts_to_an_accepted_uncompressed_syntax(qr: QRNode) -> None:
    """Stored explicit VR LE; the requestor accepted only implicit VR LE for its C-STOREs."""
    _, final, _, received = cget(qr, ident("STUDY",
                                           StudyInstanceUID="1.2.826.0.1.3680043.9.7.1"),
                                 ts="1.2.840.10008.1.2")
    assert final.Status == 0 and final.NumberOfCompletedSuboperations == 2
    sent = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in qr.files[:2]}
    for r in received:
        assert r.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
        ref = sent[r.SOPInstanceUID]
        assert r.PixelData == ref.PixelData and r.PatientName == ref.PatientName


def test_multi_pdu_objects_moved_and_got_intact(qr: QRNode, tmp_path: Path) -> None:
    """Objects of many 16 KB PDUs (storescp's and DCMTK's default) take scp/sender.py's
    framing: 40 KB and 1.3 MB explicit VR LE and a 200 KB implicit VR LE object, moved to
    storescp +tls and got by pynetdicom, arrive equal to what was stored."""
    study, series = "1.2.826.0.1.3680043.9.7.90", "1.2.826.0.1.3680043.9.7.90.1"
    files = [make_dataset(tmp_path / f"big{i}.dcm", patient_id="P9", study_uid=study,
                          series_uid=series, sop_uid=f"{series}.{i + 1}", pixel_bytes=size,
                          ts=ts, InstanceNumber=i + 1)
             for i, (size, ts) in enumerate([(40_000, "1.2.840.10008.1.2.1"),
                                              (1_300_000, "1.2.840.10008.1.2.1"),
                                              (200_000, "1.2.840.10008.1.2")])]
    qr.store(files)
    scp = StoreSCP(qr, tmp_path / "dest")
    a = qr.assoc()
    try:
        pending, final = cmove(a, ident("STUDY", StudyInstanceUID=study))
        assert final.Status == 0, final
        assert final.NumberOfCompletedSuboperations == 3
        _check_progress(pending, 3)
    finally:
        a.release()
        scp.close()
    got = {pydicom.dcmread(f).SOPInstanceUID: f for f in scp.files()}
    sent = {pydicom.dcmread(f).SOPInstanceUID: f for f in files}
    assert got.keys() == sent.keys()
    for uid, f in sent.items():
        _same_dataset(f, got[uid])
    # the requestor accepts one transfer syntax: objects stored in it take the fast path,
    # the others are converted by pynetdicom's
    for ts in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2"):
        _, final, _, received = cget(qr, ident("STUDY", StudyInstanceUID=study), ts=ts)
        assert final.Status == 0 and final.NumberOfCompletedSuboperations == 3
        assert len(received) == 3
        for r in received:
            ref = pydicom.dcmread(sent[r.SOPInstanceUID])
            assert r.PixelData == ref.PixelData and r.PatientID == ref.PatientID


def test_pending_responses_follow_pending_interval(qr: QRNode, tmp_path: Path) -> None:
    """`[query] pending_interval_ms`: 0 gives a pending response after every sub-operation;
    a long interval only the first one; the final response has exact counts either way,
    for C-MOVE and C-GET."""
    study = "1.2.826.0.1.3680043.9.7.91"
    files = [make_dataset(tmp_path / f"p{i}.dcm", patient_id="P9", study_uid=study,
                          series_uid=f"{study}.1", sop_uid=f"{study}.1.{i + 1}",
                          InstanceNumber=i + 1) for i in range(3)]
    qr.store(files)
    scp = StoreSCP(qr, tmp_path / "dest")
    try:
        for interval, remaining in ((0, [2, 1, 0]), (60_000, [2])):
            qr.node.stop()
            qr.node.set_config("query", "pending_interval_ms", interval)
            qr.node.start()
            a = qr.assoc()
            try:
                pending, final = cmove(a, ident("STUDY", StudyInstanceUID=study))
            finally:
                a.release()
            assert final.Status == 0 and final.NumberOfCompletedSuboperations == 3, final
            assert [p.NumberOfRemainingSuboperations for p in pending] == remaining
            assert [p.NumberOfCompletedSuboperations for p in pending] == \
                [3 - r for r in remaining]
            pending, final, _, received = cget(qr, ident("STUDY", StudyInstanceUID=study))
            assert final.Status == 0 and final.NumberOfCompletedSuboperations == 3, final
            assert len(received) == 3
            assert [p.NumberOfRemainingSuboperations for p in pending] == remaining
    finally:
        scp.close()
    got = {pydicom.dcmread(f).SOPInstanceUID for f in scp.files()}  # moved twice, same names
    assert got == {f"{study}.1.{i + 1}" for i in range(3)}
