"""Reading objects for C-MOVE/C-GET: verified before a byte is handed to the sender."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import pytest

from pacsd.store import retrieve
from pacsd.store.objects import IntegrityError, ObjectStore
from pacsd.store.query import Selected


def _put(store: ObjectStore, data: bytes) -> str:
    sp = store.spool()
    sp.write(data)
    store.publish(sp)
    sp.close()
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    s = ObjectStore(tmp_path / "objects")
    s.ensure()
    return s


def test_verified_source_streams_the_stored_bytes(store: ObjectStore) -> None:
    data = b"DICM" * 100_000
    sha = _put(store, data)
    with retrieve.verified_source(store, sha) as path:
        assert Path(path).read_bytes() == data


def test_renamed_over_object_is_not_what_is_sent(store: ObjectStore, tmp_path: Path) -> None:
    data = b"good" * 1000
    sha = _put(store, data)
    with retrieve.verified_source(store, sha) as path:
        evil = tmp_path / "evil"
        evil.write_bytes(b"evil")
        evil.replace(store.path_for(sha))
        assert Path(path).read_bytes() == data


def test_mismatch_and_missing_raise_before_yielding(store: ObjectStore) -> None:
    sha = _put(store, b"x" * 5000)
    p = store.path_for(sha)
    p.write_bytes(b"y" * 5000)
    entered = False
    with pytest.raises(IntegrityError) as exc, retrieve.verified_source(store, sha):
        entered = True
    assert not entered and exc.value.actual == hashlib.sha256(b"y" * 5000).hexdigest()
    p.unlink()
    with pytest.raises(IntegrityError) as exc, retrieve.verified_source(store, sha):
        pass
    assert exc.value.actual is None


class _Decrypting:
    """A store whose verified reader is not a plain file (an encrypted envelope)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def open_verified(self, sha256: str) -> Any:
        return io.BytesIO(self.data)


def test_non_file_reader_goes_through_a_private_copy(tmp_path: Path) -> None:
    with retrieve.verified_source(_Decrypting(b"plain"), "0" * 64, tmp_path) as path:
        assert Path(path).read_bytes() == b"plain"
        assert Path(path).stat().st_mode & 0o077 == 0
    assert not Path(path).exists()


def test_tally_counts() -> None:
    t = retrieve.Tally(selected=3)
    s = [Selected(f"1.{i}", "1.2", "1.2.840.10008.1.2.1", "0" * 64, 10, "9") for i in range(3)]
    t.done(s[0], "success")
    t.done(s[1], "failure")
    assert (t.completed, t.failed, t.remaining, t.bytes, t.failed_uids) == (1, 1, 1, 10, ["1.1"])


class _Envelope:
    """A decrypting reader: has the envelope file's descriptor, reads plaintext."""

    def __init__(self, envelope: Path, plaintext: bytes) -> None:
        self._f = open(envelope, "rb")  # noqa: SIM115 - closed by close()
        self._plain = io.BytesIO(plaintext)

    def fileno(self) -> int:
        return self._f.fileno()

    def read(self, n: int = -1) -> bytes:
        return self._plain.read(n)

    def close(self) -> None:
        self._f.close()


def test_wrapped_descriptor_is_not_taken_for_the_plaintext(tmp_path: Path) -> None:
    env = tmp_path / "envelope"
    env.write_bytes(b"ciphertext")

    class Store:
        def open_verified(self, sha256: str) -> Any:
            return _Envelope(env, b"plaintext")

    with retrieve.verified_source(Store(), "0" * 64, tmp_path) as path:
        assert Path(path).read_bytes() == b"plaintext"
