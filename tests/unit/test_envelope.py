"""Object envelopes (pacsd.store.envelope) and encrypted spooling/reads (store.objects)."""

from __future__ import annotations

import hashlib
import io
import os
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from pacsd.keys import FileKEK, Keyring, create_keyring
from pacsd.store import envelope
from pacsd.store.envelope import CHUNK, HEADER_SIZE, EnvelopeError, Opener, Sealer
from pacsd.store.objects import HEAD_SIZE as HEAD_SIZE_FOR_TEST
from pacsd.store.objects import IntegrityError, ObjectStore

DEK = os.urandom(32)


def seal_bytes(data: bytes, chunk: int = 1024, dek: bytes = DEK, version: int = 1) -> bytes:
    out = io.BytesIO()
    envelope.encrypt_stream(io.BytesIO(data), out, version, dek, chunk)
    return out.getvalue()


def open_bytes(blob: bytes, dek: bytes = DEK) -> bytes:
    return Opener(io.BytesIO(blob), lambda _v: dek).read()


@pytest.mark.parametrize("size", [0, 1, 1023, 1024, 1025, 4096, 5000])
def test_round_trip_at_chunk_edges(size: int) -> None:
    data = os.urandom(size)
    blob = seal_bytes(data)
    assert len(blob) == envelope.ciphertext_size(size, 1024)
    assert open_bytes(blob) == data
    assert envelope.is_envelope(blob) and not envelope.is_envelope(b"\0" * 132)


def test_header_records_version_and_hides_plaintext() -> None:
    data = b"DOE^JANE" * 500
    blob = seal_bytes(data, version=7)
    assert b"DOE^JANE" not in blob
    assert envelope.Header(blob[:HEADER_SIZE]).version == 7
    assert seal_bytes(data) != seal_bytes(data)  # fresh object key and nonce base


def test_truncation_reordering_and_flips_are_detected() -> None:
    data = os.urandom(4 * 1024 + 100)  # 4 full chunks + final
    blob = seal_bytes(data)
    step = 1024 + 16
    body = blob[HEADER_SIZE:]
    chunks = [body[i:i + step] for i in range(0, len(body), step)]
    assert len(chunks) == 5
    cases = {
        "drop final": blob[: HEADER_SIZE + 4 * step],  # ends at a chunk boundary
        "cut mid chunk": blob[:-50],
        "swap": blob[:HEADER_SIZE] + chunks[1] + chunks[0] + b"".join(chunks[2:]),
        "flip body": blob[:-1] + bytes([blob[-1] ^ 1]),
        "flip header": blob[:20] + bytes([blob[20] ^ 1]) + blob[21:],
        "append": blob + b"x",
    }
    for name, bad in cases.items():
        with pytest.raises(EnvelopeError):
            open_bytes(bad)
            pytest.fail(name)
    with pytest.raises(EnvelopeError):
        open_bytes(blob, dek=os.urandom(32))  # wrong data key


def test_chunk_from_another_object_is_refused() -> None:
    a, b = seal_bytes(b"a" * 3000), seal_bytes(b"b" * 3000)
    mixed = a[: HEADER_SIZE + 1040] + b[HEADER_SIZE + 1040:]
    with pytest.raises(EnvelopeError):
        open_bytes(mixed)


def test_sealer_enforces_framing() -> None:
    s = Sealer(1, DEK, 1024)
    with pytest.raises(ValueError):
        s.seal(b"x" * 10)  # non-final chunk must be whole
    with pytest.raises(ValueError):
        s.seal(b"x" * 1024, final=True)  # final chunk must be short


def make_store(tmp_path: Path, encrypt: bool = True) -> ObjectStore:
    key = tmp_path / "storage.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    kek = FileKEK.from_file(key)
    create_keyring(tmp_path / "keyring.json", kek)
    store = ObjectStore(tmp_path / "objects", keys=Keyring(tmp_path / "keyring.json", kek),
                        encrypt=encrypt)
    store.ensure()
    return store


def spool_and_publish(store: ObjectStore, data: bytes, piece: int = 7000) -> str:
    sp = store.spool()
    for i in range(0, len(data), piece):
        sp.write(data[i:i + piece])
    sha = sp.finish()
    store.publish(sp)
    sp.abort()
    return sha


def part10(size: int) -> bytes:
    return b"\0" * 128 + b"DICM" + b"PATIENT^NAME" + os.urandom(size)


def test_encrypted_spool_publishes_envelope_named_by_plaintext(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    data = part10(3 * CHUNK + 123)
    sha = spool_and_publish(store, data)
    assert sha == hashlib.sha256(data).hexdigest()
    raw = store.path_for(sha).read_bytes()
    assert raw[128:132] != b"DICM" and b"PATIENT^NAME" not in raw
    assert envelope.is_envelope(raw)
    assert store.key_version_of(sha) == 1
    assert store.hash_object(store.path_for(sha)) == sha
    with store.open_verified(sha) as f:
        assert f.read() == data
    # the plaintext never touched root/.tmp: nothing left there either
    assert list(store.tmp.iterdir()) == []


def test_spool_open_plaintext_reads_back_envelope(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    sp = store.spool()
    data = part10(CHUNK + 10)
    sp.write(data)
    assert sp.head == data[: len(sp.head)]
    with sp.open_plaintext() as f:
        assert f.read() == data
    assert sp.key_version == 1
    sp.abort()


def test_flipped_byte_fails_verified_read(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    sha = spool_and_publish(store, part10(CHUNK * 2))
    p = store.path_for(sha)
    raw = bytearray(p.read_bytes())
    raw[HEADER_SIZE + CHUNK + 40] ^= 0x01
    p.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="does not authenticate"):
        store.open_verified(sha)
    with pytest.raises(EnvelopeError):
        store.hash_object(p)


def test_mixed_store_reads_plaintext_and_envelopes(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    plain = ObjectStore(store.root)
    a = spool_and_publish(plain, part10(100))
    b = spool_and_publish(store, part10(100))
    assert store.key_version_of(a) is None and store.key_version_of(b) == 1
    assert store.verified_path(a) == store.path_for(a)
    with pytest.raises(ValueError, match="encrypted"):
        store.verified_path(b)
    for sha in (a, b):
        with store.open_verified(sha) as f:
            assert hashlib.sha256(f.read()).hexdigest() == sha


def test_rotation_new_spools_use_new_version_old_still_read(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    a = spool_and_publish(store, part10(10))
    assert store.keys.rotate() == 2
    b = spool_and_publish(store, part10(10))
    assert (store.key_version_of(a), store.key_version_of(b)) == (1, 2)
    with store.open_verified(a) as f:
        assert hashlib.sha256(f.read()).hexdigest() == a


def test_memory_stays_flat_for_a_large_object(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    piece = os.urandom(64 * 1024)
    tracemalloc.start()
    sp = store.spool()
    h = hashlib.sha256()
    for _ in range(40 * 1024 * 1024 // len(piece)):  # 40 MiB
        sp.write(piece)
        h.update(piece)
    sha = sp.finish()
    store.publish(sp)
    sp.abort()
    with store.open_plaintext(store.path_for(sha)) as f:
        while f.read(1024 * 1024):
            pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert sha == h.hexdigest()
    assert peak < 8 * 1024 * 1024, peak


# --------------------------------------------------------------------------- through Store


def encrypted_store(tmp_path: Path) -> Any:
    from pacsd import config as configmod
    from pacsd.store.ingest import Store

    (tmp_path / "tls").mkdir()
    key = tmp_path / "tls" / "storage.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    cfg_path = tmp_path / "pacsd.toml"
    cfg_path.write_text("[storage]\nmin_free_mb = 0\nencryption = true\n")
    return Store.open(configmod.load(cfg_path)), cfg_path


def test_ingest_encrypted_with_header_beyond_head_and_key_version(tmp_path: Path) -> None:
    from pydicom.uid import ImplicitVRLittleEndian

    from pacsd.store.index import Instance
    from tests.unit.test_store_ingest import make_dataset, put

    store, _ = encrypted_store(tmp_path)
    ds = make_dataset()
    ds.add_new(0x00090010, "LO", "BIGVENDOR")
    ds.add_new(0x00091001, "OB", os.urandom(HEAD_SIZE_FOR_TEST + 1000))  # before group 0x20
    r = put(store, ds, ts=ImplicitVRLittleEndian)  # header parse must read the envelope back
    assert r.ok, r.message
    row = Instance.get()
    assert row.key_version == 1 and row.sha256 == r.sha256
    raw = store.objects.path_for(r.sha256).read_bytes()
    assert envelope.is_envelope(raw) and b"Doe^Jane" not in raw
    store.close()


def test_sweep_removes_unindexed_encrypted_object_after_crash(tmp_path: Path) -> None:
    from pacsd import config as configmod
    from pacsd.store.ingest import Store

    store, cfg_path = encrypted_store(tmp_path)
    sp = store.spool()
    sp.write(part10(1000))
    sha = sp.finish()
    store.objects.publish(sp)  # published, then the process "dies" before the index commit
    sp.close()  # its lock goes with it; the temp name stays as a second link
    assert store.objects.path_for(sha).stat().st_nlink == 2
    store.close()
    reopened = Store.open(configmod.load(cfg_path))
    assert reopened.swept == 1
    assert not reopened.objects.path_for(sha).exists()  # the sweep decrypted it to know
    reopened.close()


def test_opener_seeks_like_a_file() -> None:
    import random

    data = os.urandom(5 * 1024 + 300)
    f = Opener(io.BytesIO(seal_bytes(data)), lambda _v: DEK)
    ref = io.BytesIO(data)
    rng = random.Random(7)
    for _ in range(200):
        op = rng.choice(["read", "seek", "seek_cur", "seek_end"])
        if op == "read":
            n = rng.randint(0, 3000)
            assert f.read(n) == ref.read(n)
        elif op == "seek":
            pos = rng.randint(0, len(data))
            assert f.seek(pos) == ref.seek(pos)
        elif op == "seek_cur":
            d = rng.randint(-ref.tell(), 2000)
            assert f.seek(d, os.SEEK_CUR) == ref.seek(d, os.SEEK_CUR)
        else:
            d = -rng.randint(0, len(data))
            assert f.seek(d, os.SEEK_END) == ref.seek(d, os.SEEK_END)
        assert f.tell() == ref.tell()
    assert f.seek(0) == 0 and f.read() == data
    assert f.seek(len(data) + 50) == len(data) and f.read() == b""  # clamped at the end
