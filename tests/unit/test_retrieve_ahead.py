"""retrieve.VerifyAhead: the next object is verified in the background while the current
one is sent, and still nothing is handed out before its check passed."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from pacsd.store import retrieve
from pacsd.store.objects import IntegrityError, ObjectStore
from pacsd.store.query import Selected

from .test_query_retrieve import _put


class Recording(ObjectStore):
    """An ObjectStore that records which thread verified which object."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.calls: list[tuple[str, str]] = []
        self.nice: list[int] = []  # the verifying thread's niceness
        self.opened: list[object] = []

    def open_verified(self, sha256: str):  # type: ignore[no-untyped-def]
        self.calls.append((sha256, threading.current_thread().name))
        self.nice.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        f = super().open_verified(sha256)
        self.opened.append(f)
        return f


@pytest.fixture
def objects(tmp_path: Path) -> tuple[Recording, list[Selected], list[bytes]]:
    store = Recording(tmp_path / "objects")
    store.ensure()
    datas = [bytes([i]) * (100_000 + i) for i in range(4)]
    sels = [Selected(f"1.2.3.{i}", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                     _put(store, d), len(d), "1.2.3") for i, d in enumerate(datas)]
    return store, sels, datas


def test_in_order_each_verified_ahead_in_the_background(objects) -> None:  # type: ignore[no-untyped-def]
    store, sels, datas = objects
    ahead = retrieve.VerifyAhead(store, sels)
    for sel, data in zip(sels, datas, strict=True):
        with ahead.open(sel) as f:
            assert f.read() == data
    ahead.close()
    assert [sha for sha, _ in store.calls] == [s.sha256 for s in sels]
    threads = [name for _, name in store.calls]
    assert threads[0] == threading.current_thread().name  # the first has nobody ahead
    assert all(name.startswith("pacsd-verify") for name in threads[1:])
    # read-ahead yields the cores to the sender (and everyone else): a lower priority,
    # for its own thread only
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert store.nice[0] == base
    assert store.nice[1:] == [min(19, base + retrieve.VERIFY_NICE)] * 3


def test_corrupt_object_raises_when_asked_for_not_before(objects) -> None:  # type: ignore[no-untyped-def]
    store, sels, datas = objects
    victim = store.path_for(sels[1].sha256)
    victim.chmod(0o600)
    victim.write_bytes(b"X" + datas[1][1:])
    ahead = retrieve.VerifyAhead(store, sels)
    with ahead.open(sels[0]) as f:  # the next one (corrupt) is being checked meanwhile
        assert f.read() == datas[0]
    with pytest.raises(IntegrityError):
        ahead.open(sels[1])
    with ahead.open(sels[2]) as f:  # and the retrieve goes on
        assert f.read() == datas[2]
    ahead.close()


def test_out_of_order_and_unused_objects_are_closed(objects) -> None:  # type: ignore[no-untyped-def]
    store, sels, datas = objects
    ahead = retrieve.VerifyAhead(store, sels)
    with ahead.open(sels[0]) as f:
        assert f.read() == datas[0]
    with ahead.open(sels[2]) as f:  # not the one verified ahead: verified now, sels[1] closed
        assert f.read() == datas[2]
    ahead.close()  # sels[3] was verified ahead for nobody: closed
    ahead._pool.shutdown(wait=True)  # type: ignore[union-attr]
    for _ in range(100):
        if sum(1 for f in store.opened if not f.closed) == 0:  # type: ignore[attr-defined]
            break
        threading.Event().wait(0.01)
    assert [f.closed for f in store.opened] == [True] * len(store.opened)  # type: ignore[attr-defined]
    assert [sha for sha, _ in store.calls] == [sels[i].sha256 for i in (0, 1, 2, 3)]
