"""The audit sequencer (one per node) and the worker-side client that feeds it.

The sequencer runs in the supervisor (DESIGN §1a). One thread takes records from a
bounded queue, gives each the next `seq` and `chain`, persists the chain state, then
sends the RFC 5424 message; while the collector is unreachable the messages go to the
spool (fsynced per batch) and are replayed in order once it answers again. It also
watches every record for alert patterns, since it is the one place that sees all.
Workers reach it over a unix stream socket (0600, same uid only), one JSON record per
line; their client never blocks the caller either.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import queue
import socket
import stat
import struct
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from pacsd.audit import atna, chain
from pacsd.audit.events import (
    ALERT_EVENTS,
    RESERVED_FIELDS,
    SEVERITY,
    Event,
    Outcome,
    check_field,
)
from pacsd.audit.syslog import FACILITIES, Transport, format_message, open_transport
from pacsd.config import Config
from pacsd.errors import EnvironmentProblem

log = structlog.get_logger(__name__)

SOCKET_NAME = "audit.sock"
SPOOL_FILE = "spool.log"
BATCH = 512  # records numbered and persisted together
RETRY_INITIAL = 0.5  # seconds before the first reconnect; doubles up to retry_max
RETRY_MAX = 10.0
SEND_TIMEOUT = 5.0
_MAX_UNIX_PATH = 100  # sun_path holds 108 bytes

_render_json = structlog.processors.JSONRenderer(serializer=lambda obj, **_: chain.canonical(obj))


def now_rfc3339() -> str:
    """UTC now as RFC 3339 with microseconds, e.g. 2026-01-02T03:04:05.123456Z."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def socket_path_for(cfg: Config) -> str:
    """Where the sequencer listens: <spool>/audit.sock, or a private temp dir if too long."""
    p = Path(cfg.audit.spool) / SOCKET_NAME
    if len(os.fsencode(p)) <= _MAX_UNIX_PATH:
        return str(p)
    digest = hashlib.sha256(os.fsencode(p)).hexdigest()[:20]
    return str(Path(tempfile.gettempdir()) / f"pacsd-audit-{os.getuid()}" / f"{digest}.sock")


def _private_dir(path: Path) -> None:
    """Create (0700) or check a directory that only we may use; raises EnvironmentProblem."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.lstat()
    except OSError as exc:
        raise EnvironmentProblem(f"{path}: cannot create: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise EnvironmentProblem(f"{path}: must be a directory owned by us with mode 0700")


def socket_live(path: str) -> bool:
    """True when a sequencer accepts connections on `path`."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(path)
    except OSError:
        return False
    finally:
        s.close()
    return True


def validate_forwarded(obj: Any) -> dict[str, Any]:
    """Check a record that arrived over the socket as record() would; raises ValueError."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    rec: dict[str, Any] = {
        "ts": str(obj["ts"]),
        "event": Event(obj["event"]).value,
        "outcome": int(Outcome(obj["outcome"])),
    }
    for key, value in obj.items():
        if key not in RESERVED_FIELDS:
            rec[key] = check_field(key, value)
        elif key in ("seq", "chain"):
            raise ValueError("a forwarded record must not carry seq or chain")
    return rec


class _DroppingQueue:
    """A bounded record queue that never blocks its producer: a full queue drops and counts."""

    _queue: queue.Queue[dict[str, Any]]
    _count_lock: threading.Lock
    dropped: int

    def submit(self, rec: dict[str, Any]) -> None:
        """Queue a record without ever blocking; a full queue drops it and counts the drop."""
        try:
            self._queue.put_nowait(rec)
        except queue.Full:
            with self._count_lock:
                self.dropped += 1


class Sequencer(_DroppingQueue):
    """Numbers, chains, sends and spools every audit record of the node.

    Raises EnvironmentProblem when the spool is unusable or another process holds the chain.
    """

    def __init__(self, cfg: Config, *, listen: bool = True, lock: chain.ChainLock | None = None,
                 lock_timeout: float = 30.0, retry_max: float = RETRY_MAX) -> None:
        a = cfg.audit
        self.spool = Path(a.spool)
        chain.ensure_spool(self.spool)
        self._lock = lock or chain.ChainLock(self.spool)
        if lock is None:
            self._lock.acquire(lock_timeout)
        try:
            self._state = chain.load_state(self.spool)
        except EnvironmentProblem:
            self._lock.release()
            raise
        self._apply(cfg)
        self._pending_cfg: Config | None = None
        self._hostname = socket.gethostname()
        self._pid = os.getpid()
        self._failures: dict[str, deque[float]] = {}
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=a.queue_size)
        self._count_lock = threading.Lock()
        self.dropped = 0
        self._dropped_reported = 0
        self.sent = 0
        self.spooled = 0
        self._transport: Transport | None = None
        self._retry_initial, self._retry_max = RETRY_INITIAL, retry_max
        self._backoff = RETRY_INITIAL
        self._next_try = 0.0
        self._down_logged = False
        self._spool_path = self.spool / SPOOL_FILE
        if self._state.spool_offset > self._spool_size():  # spool truncated behind our back
            self._state.spool_offset = 0
        self._spool_pending = self._spool_size() > self._state.spool_offset
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-sequencer", daemon=True)
        self._thread.start()
        self._listener: _Listener | None = None
        self.socket_path = socket_path_for(cfg)
        if listen:
            try:
                self._listener = _Listener(self.socket_path, self)
            except EnvironmentProblem:
                self.shutdown(1.0)
                raise

    # ------------------------------------------------------------------ intake

    def submit_wait(self, rec: dict[str, Any], timeout: float) -> bool:
        """Queue a record, waiting up to timeout (socket readers: pushes back on the worker)."""
        try:
            self._queue.put(rec, timeout=timeout)
        except queue.Full:
            return False
        return True

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued has been delivered (not merely spooled)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0 and not self._spool_pending:
                return True
            time.sleep(0.02)
        return False

    def shutdown(self, timeout: float) -> None:
        """Stop listening, sequence what is queued, deliver or spool it, release the chain."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._stop.set()
        self._thread.join(timeout)
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self._lock.release()

    def reconfigure(self, cfg: Config) -> None:
        """On reload: take the new target, format, facility and alert thresholds.

        The spool directory and queue size stay as started (they need a restart).
        """
        if cfg.audit.spool != str(self.spool) or cfg.audit.queue_size != self._queue.maxsize:
            log.warning("audit_reload_partial", detail="spool and queue_size apply at restart")
        self._pending_cfg = cfg

    def _apply(self, cfg: Config) -> None:
        a = cfg.audit
        self._url, self._ca, self._cert, self._key = (a.syslog, a.syslog_ca, a.syslog_cert,
                                                      a.syslog_key)
        self._facility = FACILITIES[a.facility]
        self._atna = a.format == "atna"
        self._node_ae = cfg.node.ae_title
        self._alert_failures, self._alert_window = a.alert_failures, a.alert_window

    @property
    def state(self) -> tuple[int, str]:
        return self._state.seq, self._state.chain

    # ------------------------------------------------------------------ the sequencer thread

    def _run(self) -> None:
        while True:
            batch: list[dict[str, Any]] = []
            try:
                batch.append(self._queue.get(timeout=0.2))
                while len(batch) < BATCH:
                    batch.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            pending, self._pending_cfg = self._pending_cfg, None
            if pending is not None:
                self._apply(pending)
                if self._transport is not None:
                    self._transport.close()
                    self._transport = None
                self._next_try = 0.0
                self._backoff = self._retry_initial
            try:
                self._process(batch)
            except Exception:  # the sequencer must outlive any one bad record
                log.exception("audit_sequencer_error")
            for _ in batch:
                self._queue.task_done()
            if self._stop.is_set() and self._queue.empty():
                return

    def _process(self, batch: list[dict[str, Any]]) -> None:
        out: list[bytes] = []
        for rec in batch:
            try:
                out.append(self._seal(rec))
                out.extend(self._seal(alert) for alert in self._alerts(rec, self._state.seq))
            except (ValueError, TypeError, KeyError) as exc:  # one bad record, not the batch
                log.error("audit_record_unsealable", audit_event=str(rec.get("event")),
                          error=str(exc))
                with self._count_lock:
                    self.dropped += 1
        with self._count_lock:
            lost = self.dropped - self._dropped_reported
            self._dropped_reported = self.dropped
        if lost:
            out.append(self._seal({"ts": now_rfc3339(), "event": Event.AUDIT_DROPPED.value,
                                   "outcome": int(Outcome.SERIOUS), "count": lost,
                                   "total": self._dropped_reported}))
        if out:
            chain.save_state(self.spool, self._state)  # before sending: a seq is never reused
        self._deliver(out)

    def _seal(self, rec: dict[str, Any]) -> bytes:
        seq = self._state.seq + 1
        if self._atna:
            body = atna.render(rec, node_ae=self._node_ae, hostname=self._hostname)
            new_chain = chain.link(self._state.chain, chain.atna_payload(seq, body))
            sd = f'[{chain.SD_ID} seq="{seq}" chain="{new_chain}"]'
        else:
            rec["seq"] = seq
            new_chain = chain.link(self._state.chain, chain.json_payload(rec))
            rec["chain"] = new_chain
            body = str(_render_json(None, "audit", rec))
            sd = "-"
        self._state.seq, self._state.chain = seq, new_chain
        event = rec["event"]
        severity = 1 if event in ALERT_EVENTS else SEVERITY[Outcome(rec["outcome"])]
        return format_message(facility=self._facility, severity=severity, timestamp=rec["ts"],
                              hostname=self._hostname, procid=self._pid, msgid=event,
                              structured_data=sd, msg=body)

    def _alerts(self, rec: dict[str, Any], seq: int) -> Iterable[dict[str, Any]]:
        event = rec["event"]
        base = {"ts": now_rfc3339(), "event": Event.ALERT_ANOMALY.value,
                "outcome": int(Outcome.SERIOUS), "trigger_seq": seq}
        if event == Event.INTEGRITY_FAILURE:
            keep = {k: v for k, v in rec.items()
                    if k in ("study_uid", "sop_instance_uid", "sha256", "source_ip", "assoc_id")}
            yield {**base, "reason": "integrity_failure", **keep}
        elif event in (Event.ASSOC_REJECTED, Event.AUTH_FAILURE) and rec.get("source_ip"):
            ip = str(rec["source_ip"])
            now = time.monotonic()
            window = self._failures.setdefault(ip, deque())
            window.append(now)
            while window and window[0] < now - self._alert_window:
                window.popleft()
            if len(window) >= self._alert_failures:
                yield {**base, "reason": "failure_burst", "source_ip": ip, "count": len(window),
                       "window_seconds": self._alert_window}
                window.clear()
            if len(self._failures) > 10_000:  # forget quiet addresses
                self._failures = {k: v for k, v in self._failures.items()
                                  if v and v[-1] >= now - self._alert_window}

    # ------------------------------------------------------------------ delivery and spool

    def _deliver(self, msgs: list[bytes]) -> None:
        if self._spool_pending and not (self._connected() and self._replay()):
            self._append_spool(msgs)
            return
        if not msgs:
            return
        if not self._connected():
            self._append_spool(msgs)
            return
        assert self._transport is not None
        for i, msg in enumerate(msgs):
            try:
                self._transport.send(msg)
            except OSError as exc:
                if self._oversized(exc):
                    continue
                self._lost_connection(exc)
                self._append_spool(msgs[i:])
                return
            self.sent += 1

    def _oversized(self, exc: OSError) -> bool:
        """A datagram too big for this transport can never be sent: count it as dropped
        (audited as audit.dropped) rather than let it block the spool forever."""
        if exc.errno != errno.EMSGSIZE:
            return False
        log.error("audit_message_too_large", target=self._url)
        with self._count_lock:
            self.dropped += 1
        return True

    def _connected(self) -> bool:
        if self._transport is not None:
            if self._transport.alive():
                return True
            self._lost_connection(ConnectionResetError("closed by the collector"))
        if time.monotonic() < self._next_try:
            return False
        try:
            self._transport = open_transport(self._url, ca=self._ca, cert=self._cert,
                                             key=self._key, timeout=SEND_TIMEOUT)
        except (OSError, ValueError) as exc:
            self._next_try = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, self._retry_max)
            if not self._down_logged:
                log.warning("audit_syslog_unreachable", target=self._url, error=str(exc))
                self._down_logged = True
            return False
        if self._down_logged:
            log.info("audit_syslog_reconnected", target=self._url)
        self._down_logged = False
        self._backoff = self._retry_initial
        return True

    def _lost_connection(self, exc: BaseException) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self._next_try = time.monotonic() + self._backoff
        if not self._down_logged:
            log.warning("audit_syslog_lost", target=self._url, error=str(exc))
            self._down_logged = True

    def _spool_size(self) -> int:
        try:
            return self._spool_path.stat().st_size
        except FileNotFoundError:
            return 0

    def _append_spool(self, msgs: list[bytes]) -> None:
        if not msgs:
            return
        fd = os.open(self._spool_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, b"".join(m + b"\n" for m in msgs))
            os.fsync(fd)
        finally:
            os.close(fd)
        self.spooled += len(msgs)
        self._spool_pending = True

    def _replay(self) -> bool:
        """Send the spool from the saved offset, in order; True when it is all delivered."""
        assert self._transport is not None
        offset = self._state.spool_offset
        sent_since_save = 0
        with open(self._spool_path, "rb") as fh:
            fh.seek(offset)
            for line in fh:
                if not line.endswith(b"\n"):
                    break  # a torn last line from a crash mid-write: never sent as a record
                try:
                    self._transport.send(line[:-1])
                except OSError as exc:
                    if self._oversized(exc):
                        offset += len(line)
                        continue
                    self._lost_connection(exc)
                    self._state.spool_offset = offset
                    chain.save_state(self.spool, self._state)
                    return False
                offset += len(line)
                self.sent += 1
                sent_since_save += 1
                if sent_since_save >= BATCH:
                    self._state.spool_offset = offset
                    chain.save_state(self.spool, self._state)
                    sent_since_save = 0
        os.truncate(self._spool_path, 0)
        self._state.spool_offset = 0
        chain.save_state(self.spool, self._state)
        self._spool_pending = False
        log.info("audit_spool_replayed", target=self._url)
        return True


class _Listener:
    """Accepts worker connections on a 0600 unix socket; one reader thread per worker."""

    def __init__(self, path: str, sequencer: Sequencer) -> None:
        self.path = path
        self._seq = sequencer
        if Path(path).parent != sequencer.spool:
            _private_dir(Path(path).parent)
        with contextlib.suppress(FileNotFoundError):
            Path(path).unlink()  # we hold the chain lock: any socket file here is stale
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self._sock.bind(path)
        except OSError as exc:
            self._sock.close()
            raise EnvironmentProblem(f"{path}: cannot listen for audit records: {exc}") from None
        finally:
            os.umask(old)
        Path(path).chmod(0o600)
        self._sock.listen(64)
        self._sock.settimeout(0.5)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="audit-listener", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            if uid not in (os.getuid(), 0):
                conn.close()
                continue
            threading.Thread(target=self._read, args=(conn,), name="audit-reader",
                             daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as fh:
            for line in fh:
                if not line.endswith(b"\n"):
                    break  # torn by a dying worker
                try:
                    rec = validate_forwarded(json.loads(line))
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("audit_forwarded_record_refused", error=str(exc))
                    continue
                while not self._seq.submit_wait(rec, 1.0):
                    if self._closed.is_set():
                        return

    def close(self) -> None:
        self._closed.set()
        self._sock.close()
        with contextlib.suppress(OSError):
            Path(self.path).unlink()
        self._thread.join(2.0)


class WorkerClient(_DroppingQueue):
    """A worker's link to the sequencer: a bounded queue and one sender thread."""

    def __init__(self, socket_path: str, queue_size: int = 10_000,
                 retry_max: float = 2.0) -> None:
        self.socket_path = socket_path
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=queue_size)
        self._count_lock = threading.Lock()
        self.dropped = 0
        self._dropped_reported = 0
        self._retry_max = retry_max
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-forwarder", daemon=True)
        self._thread.start()

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued was handed to the sequencer."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.02)
        return False

    def shutdown(self, timeout: float) -> None:
        self.flush(timeout)
        self._stop.set()
        self._thread.join(1.0)
        if self._sock is not None:
            self._sock.close()

    def _connect(self) -> bool:
        backoff = 0.05
        while not self._stop.is_set():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.socket_path)
            except OSError:
                s.close()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self._retry_max)
                continue
            self._sock = s
            return True
        return False

    def _run(self) -> None:
        while not (self._stop.is_set() and self._queue.empty()):
            batch: list[dict[str, Any]] = []
            try:
                batch.append(self._queue.get(timeout=0.2))
                while len(batch) < BATCH:
                    batch.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            with self._count_lock:
                lost = self.dropped - self._dropped_reported
                self._dropped_reported = self.dropped
            extra = [{"ts": now_rfc3339(), "event": Event.AUDIT_DROPPED.value,
                      "outcome": int(Outcome.SERIOUS), "count": lost, "total": self.dropped,
                      "where": "worker"}] if lost else []
            data = b"".join(chain.canonical(r).encode("ascii") + b"\n" for r in batch + extra)
            while data:
                if self._sock is None and not self._connect():
                    break
                assert self._sock is not None
                try:
                    self._sock.sendall(data)
                    data = b""
                except OSError:
                    self._sock.close()
                    self._sock = None
            for _ in batch:
                self._queue.task_done()
