"""Hash chain of audit records: canonical form, persisted chain state, and `audit verify`.

Each record carries `seq` (1, 2, 3, ... for the life of the node) and `chain`, the
SHA-256 (hex) of the previous record's chain followed by this record's payload: its
canonical JSON without `chain` (json format), or "<seq> <xml>" (atna format, where
seq and chain travel in the RFC 5424 structured data). The first record follows
GENESIS. Deleting, inserting, reordering or editing any record breaks the chain at
that point, which `verify_file` names by line number.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pacsd.errors import EnvironmentProblem
from pacsd.fsutil import fsync_dir

GENESIS = "0" * 64
STATE_FILE = "chain.state"
LOCK_FILE = "chain.lock"
SD_ID = "pacsd@32473"  # structured-data id (32473 is the example enterprise number, RFC 5612)

_SD_RE = re.compile(r'\[' + re.escape(SD_ID) + r' seq="(\d+)" chain="([0-9a-f]{64})"\] (.*)$')
_PACSD_LINE_RE = re.compile(r"^<\d+>1 \S+ \S+ pacsd |\spacsd(\[\d+\])?: |^\S+ \S+ pacsd ")


def canonical(record: Mapping[str, Any]) -> str:
    """The one JSON text of a record that the chain hashes: sorted keys, no spaces, ASCII."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


def link(prev_chain: str, payload: str) -> str:
    """chain = SHA-256(previous chain + payload), hex."""
    return hashlib.sha256((prev_chain + payload).encode("utf-8")).hexdigest()


def json_payload(record: Mapping[str, Any]) -> str:
    return canonical({k: v for k, v in record.items() if k != "chain"})


def atna_payload(seq: int, xml: str) -> str:
    return f"{seq} {xml}"


# --------------------------------------------------------------------------- persisted state


@dataclass
class ChainState:
    """The last seq and chain handed out, and how far the spool has been replayed."""

    seq: int = 0
    chain: str = GENESIS
    spool_offset: int = 0


def load_state(spool: Path) -> ChainState:
    """Read <spool>/chain.state; a missing file starts a new chain. Raises EnvironmentProblem."""
    p = spool / STATE_FILE
    try:
        data = json.loads(p.read_text(encoding="ascii"))
        state = ChainState(int(data["seq"]), str(data["chain"]), int(data.get("spool_offset", 0)))
    except FileNotFoundError:
        return ChainState()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EnvironmentProblem(f"{p}: unreadable audit chain state: {exc}") from None
    if not re.fullmatch(r"[0-9a-f]{64}", state.chain) or state.seq < 0:
        raise EnvironmentProblem(f"{p}: corrupt audit chain state")
    return state


def save_state(spool: Path, state: ChainState) -> None:
    """Atomically replace <spool>/chain.state (temp file, fsync, rename, fsync directory)."""
    p = spool / STATE_FILE
    tmp = spool / (STATE_FILE + ".tmp")
    body = json.dumps({"seq": state.seq, "chain": state.chain,
                       "spool_offset": state.spool_offset}).encode("ascii")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(p)
    fsync_dir(spool)


def ensure_spool(spool: Path) -> None:
    """Create the spool directory 0700; raises EnvironmentProblem if impossible."""
    try:
        spool.mkdir(parents=True, exist_ok=True, mode=0o700)
        if spool.stat().st_mode & 0o077 and spool.stat().st_uid == os.getuid():
            spool.chmod(0o700)  # it holds audit records: for our eyes only
    except OSError as exc:
        raise EnvironmentProblem(f"{spool}: cannot create audit spool: {exc}") from None


class ChainLock:
    """An exclusive flock on <spool>/chain.lock: one process at a time extends the chain."""

    def __init__(self, spool: Path) -> None:
        self.path = spool / LOCK_FILE
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock if free; raises EnvironmentProblem if the lock file is not ours to open."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise EnvironmentProblem(f"{self.path}: cannot open the audit chain lock: "
                                     f"{exc.strerror} (run as the pacsd user?)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def acquire(self, timeout: float) -> None:
        """Wait up to timeout seconds; raises EnvironmentProblem if another process keeps it."""
        deadline = time.monotonic() + timeout
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                raise EnvironmentProblem(
                    f"{self.path}: the audit chain is held by another pacsd process")
            time.sleep(0.05)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


# --------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class Parsed:
    line: int
    seq: int
    chain: str
    payload: str


class _Unparsable(Exception):
    pass


def parse_line(text: str) -> tuple[int, str, str] | None:
    """(seq, chain, payload) of one syslog line holding a pacsd record, or None if it holds none.

    Raises _Unparsable when the line is a pacsd message whose record cannot be read.
    """
    text = text.rstrip("\r\n")
    m = _SD_RE.search(text)
    if m:
        return int(m.group(1)), m.group(2), atna_payload(int(m.group(1)), m.group(3))
    idx = text.find("{")
    while idx >= 0:
        try:
            obj = json.loads(text[idx:].rstrip())
        except ValueError:
            idx = text.find("{", idx + 1)
            continue
        if isinstance(obj, dict) and "seq" in obj and "chain" in obj:
            seq, chain = obj["seq"], obj["chain"]
            if isinstance(seq, int) and isinstance(chain, str):
                return seq, chain, json_payload(obj)
        break
    if _PACSD_LINE_RE.search(text):
        raise _Unparsable
    return None


def _records(lines: Iterator[str]) -> Iterator[Parsed | tuple[int, str]]:
    for n, text in enumerate(lines, 1):
        try:
            got = parse_line(text)
        except _Unparsable:
            yield n, "a pacsd message whose record cannot be read (altered?)"
            continue
        if got is not None:
            yield Parsed(n, *got)


def check_lines(lines: Iterator[str]) -> tuple[bool, str]:
    """Check seq continuity and the chain; returns (ok, one-line report)."""
    prev: Parsed | None = None
    first: Parsed | None = None
    count = dups = 0
    for item in _records(lines):
        if isinstance(item, tuple):
            return False, f"line {item[0]}: {item[1]}"
        rec = item
        if prev is None:
            first = rec
            if rec.seq == 1 and link(GENESIS, rec.payload) != rec.chain:
                return False, f"line {rec.line}: record seq 1 altered (chain does not match)"
        elif rec.seq == prev.seq and rec.chain == prev.chain and rec.payload == prev.payload:
            dups += 1  # the same record delivered twice (a replay after a crash): not a loss
            continue
        elif rec.seq <= prev.seq:
            return False, (f"line {rec.line}: seq {rec.seq} follows seq {prev.seq} "
                           f"(line {prev.line}): records out of order, repeated or chain restarted")
        elif rec.seq != prev.seq + 1:
            missing = (f"seq {prev.seq + 1}" if rec.seq == prev.seq + 2
                       else f"seq {prev.seq + 1}..{rec.seq - 1}")
            return False, f"line {rec.line}: gap before seq {rec.seq}: {missing} missing"
        elif link(prev.chain, rec.payload) != rec.chain:
            return False, f"line {rec.line}: record seq {rec.seq} altered (chain does not match)"
        prev = rec
        count += 1
    if prev is None or first is None:
        return False, "no pacsd audit records found"
    note = "" if first.seq == 1 else f" (starts at seq {first.seq}: its predecessor is not here)"
    dup = f", {dups} duplicate deliveries ignored" if dups else ""
    return True, f"OK: {count} records, seq {first.seq}..{prev.seq}, chain intact{note}{dup}"


def verify_file(path: Path) -> int:
    """Check the audit records in a syslog file; print OK or the first fault; return 0 or 1.

    Raises EnvironmentProblem when the file cannot be read.
    """
    try:
        with open(path, encoding="utf-8", errors="replace", newline="\n") as fh:
            ok, report = check_lines(iter(fh))
    except OSError as exc:
        raise EnvironmentProblem(f"{path}: cannot read: {exc.strerror or exc}") from None
    print(f"{path}: {report}" if not ok else report)
    return 0 if ok else 1
