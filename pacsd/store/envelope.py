"""Object envelopes: streamed, chunked AES-256-GCM (encryption at rest, issue 7).

Every object gets its own random 256-bit object key, wrapped (AES-256-GCM) by the data
key of the current key version (`pacsd.keys`). The plaintext is cut into chunks of
CHUNK bytes; chunk i is sealed with nonce = nonce_base (8 random bytes) || i (4 bytes,
big-endian) and associated data = one byte, 1 for the final chunk and 0 otherwise.
The final chunk is always shorter than CHUNK (possibly empty), so a reader knows where
the object ends: a truncated file lacks its final chunk, a reordered or repeated chunk
has the wrong nonce, and a chunk moved from another object has the wrong key; each is
a tag failure. Memory stays at one chunk whatever the object size.

Layout (big-endian):

    magic "PACSDENV" (8) | format 1 (1) | algorithm 1 = AES-256-GCM chunked (1) |
    reserved 0 (2) | key version (4) | chunk size (4) | nonce base (8) |
    wrapped key length (2) | wrapped object key: nonce (12) + key (32) + tag (16)
    then chunks: ciphertext + tag (16)

The wrapped object key carries the 30 header bytes before it as associated data, so
the whole header is authenticated. A plaintext Part 10 file as pacsd writes it starts
with a zero preamble, never with the magic, so the two are told apart by the first
bytes (a store may hold both while `pacsd key encrypt-existing` runs).
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"PACSDENV"
FORMAT = 1
ALGORITHM = 1
CHUNK = 256 * 1024
TAG = 16
_PREFIX = struct.Struct(">8sBBHII8sH")  # 30 bytes up to and including the wrapped length
_WRAP_NONCE = 12
_WRAPPED_LEN = _WRAP_NONCE + 32 + TAG
HEADER_SIZE = _PREFIX.size + _WRAPPED_LEN
_MAX_CHUNK = 64 * 1024 * 1024
_FINAL = b"\x01"
_MORE = b"\x00"

DekLookup = Callable[[int], bytes]  # key version -> data key (raises when unknown)


class EnvelopeError(ValueError):
    """An envelope that is malformed, truncated, altered or under an unknown key."""


def is_envelope(first_bytes: bytes) -> bool:
    return first_bytes[: len(MAGIC)] == MAGIC


def _nonce(base: bytes, counter: int) -> bytes:
    return base + struct.pack(">I", counter)


class Sealer:
    """Encrypts one object incrementally: header(), then seal() for every chunk-sized
    piece of plaintext, then final() for the remainder (shorter than CHUNK)."""

    def __init__(self, version: int, dek: bytes, chunk: int = CHUNK) -> None:
        self.version = version
        self.chunk = chunk
        obj_key = os.urandom(32)
        self._base = os.urandom(8)
        prefix = _PREFIX.pack(MAGIC, FORMAT, ALGORITHM, 0, version, chunk, self._base,
                              _WRAPPED_LEN)
        wrap_nonce = os.urandom(_WRAP_NONCE)
        self._header = prefix + wrap_nonce + AESGCM(dek).encrypt(wrap_nonce, obj_key, prefix)
        self._aead = AESGCM(obj_key)
        self._counter = 0
        self._done = False

    def header(self) -> bytes:
        return self._header

    def seal(self, chunk: Any, final: bool = False) -> bytes:
        """Ciphertext + tag of the next chunk (exactly `self.chunk` bytes unless final)."""
        if self._done:
            raise ValueError("envelope already finished")
        n = memoryview(chunk).nbytes
        if (final and n >= self.chunk) or (not final and n != self.chunk):
            raise ValueError("chunk size violates the framing")
        out = self._aead.encrypt(_nonce(self._base, self._counter), chunk,
                                 _FINAL if final else _MORE)
        self._counter += 1
        self._done = final
        return out

    def seal_into(self, chunk: Any, out: bytearray, final: bool = False) -> memoryview:
        """Like seal(), into the caller's buffer (len(out) >= chunk + TAG): no allocation
        per chunk, which costs more than the cipher itself. Returns the filled view."""
        if self._done:
            raise ValueError("envelope already finished")
        n = memoryview(chunk).nbytes
        if (final and n >= self.chunk) or (not final and n != self.chunk):
            raise ValueError("chunk size violates the framing")
        view = memoryview(out)[: n + TAG]
        self._aead.encrypt_into(_nonce(self._base, self._counter), chunk,
                                _FINAL if final else _MORE, view)
        self._counter += 1
        self._done = final
        return view


def ciphertext_size(plain_size: int, chunk: int = CHUNK) -> int:
    return HEADER_SIZE + plain_size + TAG * (plain_size // chunk + 1)


class Header:
    """A parsed envelope header."""

    def __init__(self, raw: bytes) -> None:
        if len(raw) < HEADER_SIZE:
            raise EnvelopeError("envelope header truncated")
        magic, fmt, alg, _res, version, chunk, base, wlen = _PREFIX.unpack_from(raw)
        if magic != MAGIC:
            raise EnvelopeError("not an envelope (bad magic)")
        if fmt != FORMAT or alg != ALGORITHM:
            raise EnvelopeError(f"unsupported envelope format {fmt}/algorithm {alg}")
        if wlen != _WRAPPED_LEN or not 0 < chunk <= _MAX_CHUNK:
            raise EnvelopeError("envelope header malformed")
        self.version: int = version
        self.chunk: int = chunk
        self.base: bytes = base
        self._prefix = raw[: _PREFIX.size]
        self._wrapped = raw[_PREFIX.size: HEADER_SIZE]

    def object_key(self, dek: bytes) -> bytes:
        w = self._wrapped
        try:
            return AESGCM(dek).decrypt(w[:_WRAP_NONCE], w[_WRAP_NONCE:], self._prefix)
        except InvalidTag:
            raise EnvelopeError("envelope header does not authenticate "
                                f"(key version {self.version})") from None


def read_header(f: IO[bytes]) -> Header:
    return Header(_read_exact(f, HEADER_SIZE))


def _readinto_exact(f: IO[bytes], buf: bytearray) -> int:
    """Fill `buf` from `f` unless the file ends first; returns the bytes read."""
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        n = f.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            break
        got += n
    return got


def _read_exact(f: IO[bytes], n: int) -> bytes:
    parts = []
    while n:
        b = f.read(n)
        if not b:
            break
        parts.append(b)
        n -= len(b)
    return b"".join(parts)


class Opener:
    """A readable stream of the plaintext of an envelope; raises EnvelopeError on the
    first chunk that does not authenticate, or at the end when the final chunk is
    missing. Only what was authenticated is ever returned."""

    plaintext_fd = False  # fileno() is the ciphertext: not usable as a plaintext path

    def __init__(self, raw: IO[bytes], deks: DekLookup, header: Header | None = None) -> None:
        self._raw = raw
        self.header = header or read_header(raw)
        try:
            dek = deks(self.header.version)
        except Exception as exc:
            raise EnvelopeError(str(exc)) from None
        self._aead = AESGCM(self.header.object_key(dek))
        self._counter = 0
        self._ct = bytearray(self.header.chunk + TAG)
        self._pt = bytearray(self.header.chunk)
        self._buf: bytes | memoryview = b""
        self._pos = 0
        self._start = 0  # plaintext offset of _buf[0]
        self._eof = False

    @property
    def version(self) -> int:
        return self.header.version

    def _next_chunk(self) -> memoryview:
        """The next chunk's plaintext, in a buffer reused by the following call."""
        want = self.header.chunk + TAG
        got = _readinto_exact(self._raw, self._ct)
        final = got < want
        if final and got < TAG:
            raise EnvelopeError(f"envelope truncated (chunk {self._counter} missing)")
        pt = memoryview(self._pt)[: got - TAG]
        try:
            self._aead.decrypt_into(_nonce(self.header.base, self._counter),
                                    memoryview(self._ct)[:got], _FINAL if final else _MORE, pt)
        except InvalidTag:
            raise EnvelopeError(f"chunk {self._counter} does not authenticate "
                                "(altered, truncated or reordered)") from None
        self._counter += 1
        if final:
            self._eof = True
        return pt

    def _advance(self) -> None:
        self._start += len(self._buf)
        self._buf, self._pos = self._next_chunk(), 0

    def chunks(self) -> Iterator[memoryview | bytes]:
        """The remaining plaintext, one authenticated chunk at a time, without copies: each
        view is valid only until the next one is asked for."""
        if self._pos < len(self._buf):
            rest = bytes(self._buf[self._pos:])
            self._pos = len(self._buf)
            yield rest
        while not self._eof:
            self._advance()
            self._pos = len(self._buf)
            yield self._buf

    def tell(self) -> int:
        return self._start + self._pos

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Seek in the plaintext (pydicom's parser skips values this way). Forward seeks
        decrypt and check the chunks passed over; a seek back before the current chunk
        starts again from the first chunk. A seek past the end stops at the end. Memory
        stays at one chunk."""
        if whence == os.SEEK_CUR:
            offset += self.tell()
        elif whence == os.SEEK_END:
            while not self._eof:
                self._advance()
            offset += self._start + len(self._buf)
        if offset < 0:
            raise ValueError("negative seek position")
        if offset < self._start:  # rewind to the first chunk
            self._raw.seek(HEADER_SIZE)
            self._counter, self._start, self._eof = 0, 0, False
            self._buf, self._pos = b"", 0
        while offset >= self._start + len(self._buf) and not self._eof:
            self._advance()
        self._pos = min(offset - self._start, len(self._buf))
        return self.tell()

    def read(self, n: int = -1) -> bytes:
        out = []
        want = n if n is not None and n >= 0 else -1
        while want != 0:
            if self._pos >= len(self._buf):
                if self._eof:
                    break
                self._advance()
                continue
            take = len(self._buf) - self._pos if want < 0 else min(want, len(self._buf) - self._pos)
            out.append(bytes(self._buf[self._pos:self._pos + take]))
            self._pos += take
            if want > 0:
                want -= take
        return b"".join(out)

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        self._raw.close()

    @property
    def closed(self) -> bool:
        return bool(self._raw.closed)

    def __enter__(self) -> Opener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def encrypt_stream(src: IO[bytes], dst: IO[bytes], version: int, dek: bytes,
                   chunk: int = CHUNK) -> int:
    """Write the envelope of everything in `src` to `dst`; returns the plaintext size."""
    s = Sealer(version, dek, chunk)
    dst.write(s.header())
    total = 0
    buf = b""
    while True:
        data = src.read(chunk)
        if not data:
            break
        buf += data
        total += len(data)
        while len(buf) >= chunk:
            dst.write(s.seal(buf[:chunk]))
            buf = buf[chunk:]
    dst.write(s.seal(buf, final=True))
    return total


class _HashingWriter:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.hash = hashlib.sha256()

    def write(self, data: bytes | memoryview) -> int:
        self.hash.update(data)
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        return len(data)


class _HashingReader:
    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.hash = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.hash.update(data)
        return data


def _new_private(dst: Path) -> int:
    return os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)


def seal_file(src: Path, dst: Path, version: int, dek: bytes) -> tuple[str, str]:
    """Encrypt the file `src` into the new file `dst` (0600, fsynced); returns
    (SHA-256 of the envelope written, SHA-256 of the plaintext read). Raises OSError."""
    fd = _new_private(dst)
    try:
        out = _HashingWriter(fd)
        with open(src, "rb") as f:
            reader = _HashingReader(f)
            encrypt_stream(reader, out, version, dek)  # type: ignore[arg-type]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        dst.unlink(missing_ok=True)
        raise
    os.close(fd)
    return out.hash.hexdigest(), reader.hash.hexdigest()


def open_file(src: Path, dst: Path, deks: DekLookup) -> str:
    """Decrypt the envelope `src` into the new file `dst` (0600, fsynced); returns the
    SHA-256 of the plaintext. Raises EnvelopeError (nothing is left at dst), OSError."""
    fd = _new_private(dst)
    try:
        out = _HashingWriter(fd)
        with Opener(open(src, "rb"), deks) as f:
            for chunk in f.chunks():
                out.write(chunk)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        dst.unlink(missing_ok=True)
        raise
    os.close(fd)
    return out.hash.hexdigest()


def is_envelope_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return is_envelope(f.read(len(MAGIC)))
