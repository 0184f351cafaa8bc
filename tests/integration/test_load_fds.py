"""Issue 9, load: after a burst of max_associations concurrent associations the workers'
file descriptors return to their baseline (they did not: each worker kept ~34 descriptors
per SQLite database, parked by SQLite behind the read lock of a long-lived connection; see
pacsd/dbutil.py).

Counts every descriptor in /proc/<pid>/fd of each worker (the supervisor's children), not
just sockets, before the burst, while it runs and after it has drained.
"""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
)

from tests.conftest import Client, Node, make_dataset, needs_dcmtk

pytestmark = needs_dcmtk

BURST = 32
# an idle worker opens a connection to the index every few seconds (the storage
# commitment dispatcher looks for due requests): the database file, its -wal and -shm
TOLERANCE = 3


def workers(node: Node) -> list[int]:
    assert node.proc is not None
    sup = node.proc.pid
    out = []
    for pid in node.pids():
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if ppid == sup:
            out.append(pid)
    return sorted(out)


def fds(pid: int) -> list[str]:
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            out.append(str(fd.readlink()))
        except OSError:
            continue
    return out


def counts(pids: list[int]) -> dict[int, int]:
    return {pid: len(fds(pid)) for pid in pids}


def settled(pids: list[int], baseline: dict[int, int] | None, timeout: float) -> dict[int, int]:
    """Counts once every worker is at most TOLERANCE above `baseline` (or, without one,
    once two readings 3 s apart agree within it), or the last reading at the timeout."""
    deadline = time.monotonic() + timeout
    now = counts(pids)
    while time.monotonic() < deadline:
        time.sleep(3)
        prev, now = now, counts(pids)
        ref = baseline or prev
        if all(now[p] <= ref[p] + TOLERANCE for p in pids):
            return now
    return now


def association(node: Node, client: Client) -> Any:
    ae = AE(ae_title=client.title)
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    return ae.associate("127.0.0.1", node.port, ae_title=node.ae_title,
                        tls_args=(node.ssl_context(client), None))


def burst(node: Node, client: Client, template: Dataset, n: int, stores: int,
          during: Any = None) -> list[str]:
    """n associations open at once, each storing and querying; `during()` runs while all
    are established. Returns the errors."""
    errors: list[str] = []
    ready = threading.Barrier(n + 1)
    done = threading.Event()

    def run(i: int) -> None:
        a = association(node, client)
        try:
            if not a.is_established:
                errors.append(f"association {i} not established")
                return
            for _ in range(stores):
                ds = copy.deepcopy(template)  # its own elements (Dataset(x) shares them)
                ds.SOPInstanceUID = generate_uid()
                ds.PatientID = f"B{i:02d}"
                st = a.send_c_store(ds)
                if st is None or getattr(st, "Status", None) != 0:
                    errors.append(f"store {i}: {st}")
            q = Dataset()
            q.QueryRetrieveLevel = "STUDY"
            q.PatientID = f"B{i:02d}"
            q.StudyInstanceUID = ""
            final = None
            for status, _ in a.send_c_find(q, StudyRootQueryRetrieveInformationModelFind):
                final = status
            if final is None or getattr(final, "Status", None) != 0:
                errors.append(f"find {i}: {final}")
        except Exception as exc:
            errors.append(f"association {i}: {exc!r}")
        finally:
            try:
                ready.wait(120)
                done.wait(120)
            finally:
                if a.is_established:
                    a.release()

    ts = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in ts:
        t.start()
    ready.wait(120)
    try:
        if during is not None:
            during()
    finally:
        done.set()
        for t in ts:
            t.join(120)
    return errors


def test_worker_descriptors_return_to_baseline_after_a_burst(node_factory: Any,
                                                             tmp_path: Path) -> None:
    node = node_factory(**{"node.workers": 2, "node.max_associations": BURST})
    client = node.add_client("BURST", permits="echo,store,find")
    template = dcmread(make_dataset(tmp_path / "t.dcm", pixel_bytes=1024))
    pids = workers(node)
    assert len(pids) == 2, pids
    # warm up (imports, first connections, pynetdicom's lazily created state), then settle
    assert burst(node, client, template, 4, 1) == []
    baseline = settled(pids, None, 30)

    loaded: dict[int, int] = {}
    errors = burst(node, client, template, BURST, 3,
                   during=lambda: loaded.update(counts(pids)))
    assert errors == [], errors[:5]
    # sanity: the burst did hold descriptors (a socket and DUL pipes per association)
    assert sum(loaded.values()) >= sum(baseline.values()) + BURST, (baseline, loaded)

    after = settled(pids, baseline, 30)
    for pid in pids:
        left = sorted(fds(pid))
        assert after[pid] <= baseline[pid] + TOLERANCE, (
            f"worker {pid}: {after[pid]} descriptors after the burst, {baseline[pid]} before "
            f"({loaded[pid]} during): {left}")
    assert workers(node) == pids  # no worker was replaced meanwhile
