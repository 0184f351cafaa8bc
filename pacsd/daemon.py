"""Process lifecycle: the supervisor (signals, sd_notify, reload, workers) and one worker.

`serve` is a small pre-fork supervisor in the style of gunicorn's arbiter: it binds the
port, starts `[node] workers` worker processes that inherit the listening socket and
accept on it, and owns what must have one owner: sd_notify, signals and reload, and the
audit sequencer (workers hand it their records over a local socket). Signal handlers
only queue the signal; the main loop dispatches (handle_hup, handle_term, ...).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import logging
import os
import select
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pacsd import audit
from pacsd import config as configmod
from pacsd.config import Config
from pacsd.errors import ConfigError, EnvironmentProblem, PacsdError

log = logging.getLogger("pacsd.daemon")

WORKER_READY_TIMEOUT = 60.0
WATCHDOG_INTERVAL = 5.0  # pings when systemd did not say (WATCHDOG_USEC unset)
STATUS_INTERVAL = 5.0  # seconds between STATUS= lines with live figures
RELOAD_DEBOUNCE = 1.0  # quiet seconds after the last change to a watched file
RETIRE_SIGNAL = signal.SIGUSR1  # supervisor -> old worker on reload: drain without deadline


def sd_notify(message: str) -> None:
    """Send a notification to systemd (no-op without NOTIFY_SOCKET)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify failed: %s", exc)


def watchdog_interval() -> float:
    """Seconds between WATCHDOG=1 pings: half of systemd's WatchdogSec, else a default."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
        return max(0.05, int(usec) / 2_000_000)
    return WATCHDOG_INTERVAL


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


# ---------------------------------------------------------------- live figures for STATUS=

_FLOCK = "hhqqi4x"  # struct flock on Linux (64-bit off_t): type, whence, start, len, pid


def slots_in_use(path: Path, limit: int) -> int:
    """How many association slots (bytes of the slots file) workers hold locked (F_GETLK)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return 0
    count, start = 0, 0
    try:
        while start < limit:
            query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, start, limit - start, 0)
            got = fcntl.fcntl(fd, fcntl.F_GETLK, query)
            ltype, _, lstart, llen, _ = struct.unpack(_FLOCK, got)
            if ltype == fcntl.F_UNLCK:
                break
            end = limit if llen == 0 else min(limit, lstart + llen)
            count += max(0, end - max(lstart, start))
            start = max(end, start + 1)
    except OSError:
        return count
    finally:
        os.close(fd)
    return count


def objects_indexed(index_path: str) -> int | None:
    """Instance rows in the index (read-only connection); None when it cannot be read."""
    try:
        con = sqlite3.connect(f"file:{index_path}?mode=ro", uri=True, timeout=1.0)
    except sqlite3.Error:
        return None
    try:
        return int(con.execute("SELECT count(*) FROM instance").fetchone()[0])
    except sqlite3.Error:
        return None
    finally:
        con.close()


# ---------------------------------------------------------------- watched files


def watched_files(cfg: Config) -> list[str]:
    """The files whose change triggers a reload: the config and the TLS material."""
    files = [cfg.source, cfg.tls.cert, cfg.tls.key, cfg.tls.client_ca,
             cfg.audit.syslog_ca, cfg.audit.syslog_cert, cfg.audit.syslog_key]
    return sorted({f for f in files if f})


def files_fingerprint(paths: list[str]) -> str:
    """SHA-256 over the names and contents of `paths` (a missing file counts as absent)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.encode() + b"\0")
        try:
            h.update(hashlib.sha256(Path(p).read_bytes()).digest())
        except OSError:
            h.update(b"-")
    return h.hexdigest()


class FileWatch:
    """watchdog (inotify) observer on the directories of the watched files.

    Events only mark the files dirty and wake the supervisor's loop, which reloads after
    RELOAD_DEBOUNCE quiet seconds and only when the contents really changed.
    """

    def __init__(self, on_change: Callable[[], None]) -> None:
        self._on_change = on_change
        self._observer: Any = None
        self._files: set[str] = set()

    def watch(self, files: list[str]) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        self.stop()
        self._files = {os.path.realpath(f) for f in files} | set(files)
        watch = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                for p in (getattr(event, "src_path", ""), getattr(event, "dest_path", "")):
                    if p and os.fsdecode(p) in watch._files:
                        watch._on_change()
                        return

        observer = Observer()
        for d in sorted({str(Path(f).parent) for f in self._files}):
            if Path(d).is_dir():
                observer.schedule(Handler(), d, recursive=False)
        observer.daemon = True
        try:
            observer.start()
        except OSError as exc:  # e.g. inotify watches exhausted: SIGHUP still works
            log.warning("cannot watch config/certificate files: %s", exc)
            return
        self._observer = observer

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(5)
            self._observer = None


def bind_listener(cfg: Config) -> socket.socket:
    """Bind and listen on [node] listen; raises EnvironmentProblem naming the address."""
    host, port = cfg.node.host, cfg.node.port
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise EnvironmentProblem(f"node.listen: cannot resolve {host!r}: {exc}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise EnvironmentProblem(f"node.listen: cannot bind {cfg.node.listen}: "
                                 f"{exc.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen[bytes]
    ready_fd: int
    ready: bool = False
    started: float = field(default_factory=time.monotonic)


SNAPSHOT_ENV = "PACSD_SNAPSHOT_FDS"


class Snapshot:
    """The config file and TLS files as last validated, held in memfds the workers inherit.

    A worker (a replacement after a crash, or a new one at reload) builds its config and
    TLS contexts from these, never from the files on disk, which may have been changed
    (or broken) since: after a refused reload the node keeps what it validated last.
    Validation reads the same bytes the workers will get, so nothing can change between.
    """

    NAMES = ("config", "cert", "key", "client_ca")

    def __init__(self, fds: dict[str, int]) -> None:
        self.fds = fds

    @classmethod
    def take(cls, source: str) -> tuple[Snapshot, Config]:
        """Copy the config and TLS files into memfds; returns the snapshot and the config
        parsed from it. Raises PacsdError when a file is unreadable or the config invalid."""
        fds: dict[str, int] = {}
        try:
            fds["config"] = _memfd("config", _read(Path(source), "config"))
            text = os.pread(fds["config"], os.fstat(fds["config"]).st_size, 0)
            try:
                cfg = configmod.parse(text.decode("utf-8"), Path(source))
            except UnicodeDecodeError:
                raise ConfigError(f"{source}: not UTF-8 text") from None
            for name in cls.NAMES[1:]:
                path = getattr(cfg.tls, name)
                fds[name] = _memfd(name, _read(Path(path), f"tls.{name}"))
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        return cls(fds), cfg

    def view(self, cfg: Config) -> Config:
        """`cfg` with its TLS paths pointing at the snapshot (valid in this process and in
        every child that inherited the descriptors under the same numbers)."""
        tls_paths = {n: f"/proc/self/fd/{self.fds[n]}" for n in self.NAMES[1:]}
        return dataclasses.replace(cfg, tls=dataclasses.replace(cfg.tls, **tls_paths))

    def explain(self, message: str, cfg: Config) -> str:
        """`message` with snapshot paths turned back into the files an operator knows."""
        for name in self.NAMES[1:]:
            message = message.replace(f"/proc/self/fd/{self.fds[name]}", getattr(cfg.tls, name))
        return message

    def env(self) -> str:
        return ",".join(f"{n}={fd}" for n, fd in self.fds.items())

    def close(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = {}


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise EnvironmentProblem(f"{key}: {path}: {exc.strerror}") from None


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(f"pacsd-{name}", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


def worker_config(source: str) -> Config:
    """The config a worker runs with: the supervisor's snapshot when there is one."""
    spec = os.environ.get(SNAPSHOT_ENV)
    if not spec:
        return configmod.load(source)
    fds = {k: int(v) for k, v in (item.split("=", 1) for item in spec.split(","))}
    text = os.pread(fds["config"], os.fstat(fds["config"]).st_size, 0).decode("utf-8")
    return Snapshot(fds).view(configmod.parse(text, Path(source)))


class Supervisor:
    """Owns the listening socket, the workers, signals, reload and sd_notify."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.sock: socket.socket | None = None
        self.workers: list[Worker] = []
        self.retiring: list[Worker] = []
        self._signals: list[int] = []
        self._wake_r, self._wake_w = socket.socketpair()
        # The signal handler writes here; it must never block (a full buffer while the
        # loop is busy would otherwise hang the handler, and the process, for good).
        self._wake_w.setblocking(False)
        self._wake_r.setblocking(False)
        self._stopping = False
        self.snapshot: Snapshot | None = None
        self.sequencer: audit.Sequencer | None = None
        self._watch = FileWatch(self._file_changed)
        self._reload_due: float | None = None
        self._files_seen = ""
        self._watchdog_every = watchdog_interval()
        self._last_ping = 0.0
        self._last_status = 0.0
        self._objects_at_start: int | None = None
        self.reloads = 0
        self._ready = False  # READY=1 sent; the systemd watchdog runs from then on

    # ---- set-up
    def prepare(self) -> None:
        """Validate everything a worker needs before binding; raises PacsdError."""
        from pacsd import app

        self.snapshot, self.cfg = Snapshot.take(self.cfg.source)
        # migrates the DBs, sweeps the spool once, loads TLS from the snapshot
        try:
            app.build_services(self.snapshot.view(self.cfg)).store.close()
        except PacsdError as exc:
            raise type(exc)(self.snapshot.explain(str(exc), self.cfg)) from None
        self.sock = bind_listener(self.cfg)

    def _spawn(self, index: int) -> Worker:
        assert self.sock is not None
        ready_r, ready_w = os.pipe()
        env = dict(os.environ)
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(name, None)  # only the supervisor talks to systemd
        if self.sequencer is not None:
            env["PACSD_AUDIT_SOCKET"] = self.sequencer.socket_path
        env["PACSD_READY_FD"] = str(ready_w)
        assert self.snapshot is not None
        env[SNAPSHOT_ENV] = self.snapshot.env()
        cmd = [sys.executable, "-m", "pacsd", "--config", self.cfg.source, "_worker",
               "--fd", str(self.sock.fileno()), "--index", str(index)]
        proc = subprocess.Popen(cmd, pass_fds=(self.sock.fileno(), ready_w,
                                               *self.snapshot.fds.values()),
                                env=env, stdin=subprocess.DEVNULL)
        os.close(ready_w)
        return Worker(index=index, proc=proc, ready_fd=ready_r)

    def _wait_ready(self, workers: list[Worker], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = [w for w in workers if not w.ready]
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise EnvironmentProblem("workers did not become ready in time")
            r, _, _ = select.select([w.ready_fd for w in pending], [], [], min(left, 0.5))
            self._ping_watchdog()  # a slow start-up or reload is not a hung loop
            for w in pending:
                if w.ready_fd in r:
                    data = os.read(w.ready_fd, 16)
                    if not data:
                        raise EnvironmentProblem(
                            f"worker {w.index} exited during start-up (code "
                            f"{w.proc.wait()}); see the lines above")
                    w.ready = True
            pending = [w for w in pending if not w.ready]

    # ---- signals and file events: record only; the loop acts
    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _file_changed(self) -> None:  # watchdog's observer thread
        self._reload_due = time.monotonic() + RELOAD_DEBOUNCE
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)

    # ---- sd_notify
    def _ping_watchdog(self) -> None:
        now = time.monotonic()
        if self._ready and now - self._last_ping >= self._watchdog_every:
            sd_notify("WATCHDOG=1")
            self._last_ping = now

    def status_line(self) -> str:
        """The live STATUS= text: listen address, associations, objects, workers."""
        from pacsd import app

        active = slots_in_use(app.slots_path(self.cfg), self.cfg.node.max_associations)
        objects = objects_indexed(self.cfg.storage.index)
        if self._objects_at_start is None:
            self._objects_at_start = objects
        stored = "objects unknown" if objects is None else (
            f"{objects} objects stored ({objects - (self._objects_at_start or 0)} since start)")
        alive = sum(1 for w in self.workers if w.proc.poll() is None)
        return (f"serving {self.cfg.node.ae_title} on {self.cfg.node.listen}: "
                f"{active} association{'s' if active != 1 else ''}, {stored}, "
                f"{alive}/{len(self.workers)} workers"
                + (f", {self.reloads} reload{'s' if self.reloads != 1 else ''}"
                   if self.reloads else ""))

    def _send_status(self) -> None:
        now = time.monotonic()
        if now - self._last_status >= STATUS_INTERVAL:
            self._last_status = now
            sd_notify(f"STATUS={self.status_line()}")

    # ---- main loop
    def run(self) -> int:
        assert self.sock is not None
        self.install_signals()
        count = self.cfg.node.worker_count()
        self.workers = [self._spawn(i) for i in range(count)]
        try:
            self._wait_ready(self.workers, WORKER_READY_TIMEOUT)
        except EnvironmentProblem:
            self._kill_all(self.workers)
            raise
        self._files_seen = files_fingerprint(watched_files(self.cfg))
        self._watch.watch(watched_files(self.cfg))
        audit.record(audit.Event("app.start"), audit.Outcome.SUCCESS,
                     ae_title=self.cfg.node.ae_title, listen=self.cfg.node.listen,
                     workers=count, pid=os.getpid())
        print(f"pacsd: serving {self.cfg.node.ae_title} on {self.cfg.node.listen} "
              f"({count} worker{'s' if count != 1 else ''}, mutual TLS)", file=sys.stderr,
              flush=True)
        self._last_status = time.monotonic()
        sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS={self.status_line()}")
        self._ready = True
        try:
            while True:
                code = self._step()
                if code is not None:
                    return code
        finally:
            self._watch.stop()

    def _step(self) -> int | None:
        """One turn of the loop: wait for a wake-up, act on signals and due reloads."""
        timeout = min(1.0, self._watchdog_every)
        if self._reload_due is not None:
            timeout = max(0.0, min(timeout, self._reload_due - time.monotonic()))
        with contextlib.suppress(InterruptedError):
            select.select([self._wake_r], [], [], timeout)
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_r.setblocking(False)
            self._wake_r.recv(256)
        while self._signals:
            sig = self._signals.pop(0)
            if sig in (signal.SIGTERM, signal.SIGINT):
                return self.handle_term()
            if sig == signal.SIGHUP:
                self.handle_hup("sighup")
        due = self._reload_due
        if due is not None and time.monotonic() >= due:
            self._reload_due = None
            if files_fingerprint(watched_files(self.cfg)) != self._files_seen:
                self.handle_hup("file_change")
        self.reap()
        self._ping_watchdog()
        self._send_status()
        return None

    def reap(self) -> None:
        """Replace workers that died; collect retired ones that finished draining."""
        for w in list(self.retiring):
            if w.proc.poll() is not None:
                self.retiring.remove(w)
                os.close(w.ready_fd)
        for i, w in enumerate(self.workers):
            code = w.proc.poll()
            if code is None or self._stopping:
                continue
            log.warning("worker %d (pid %d) exited with %s; replacing it", w.index, w.proc.pid,
                        code)
            os.close(w.ready_fd)
            new = self._spawn(w.index)
            self.workers[i] = new
            try:
                self._wait_ready([new], WORKER_READY_TIMEOUT)
            except EnvironmentProblem as exc:
                log.error("replacement worker failed: %s", exc)

    def handle_hup(self, trigger: str = "sighup") -> bool:
        """Reload: validate the new config and TLS files, then restart workers one at a time.

        Running associations finish in the retiring workers; an invalid config is refused
        (audited) and the running one stays. Returns True when the reload took effect.
        """
        from pacsd import tls

        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={_monotonic_usec()}\n"
                  "STATUS=reloading configuration and certificates")
        seen = files_fingerprint(watched_files(self.cfg))
        snapshot: Snapshot | None = None
        new = self.cfg
        try:
            snapshot, new = Snapshot.take(self.cfg.source)
            if new.node.listen != self.cfg.node.listen:
                raise ConfigError(f"{new.source}: node.listen changed; a restart is needed")
            view = snapshot.view(new)
            tls.server_context(view)
            tls.client_context(view)
            # what start-up would refuse, plus an expired certificate or CA
            problems = [p for p in tls.check_files(view) if "expired" in p]
            if problems:
                raise EnvironmentProblem("; ".join(problems))
        except PacsdError as err:
            exc = err
            if snapshot is not None:
                exc = type(err)(snapshot.explain(str(err), new))
                snapshot.close()
            self._files_seen = seen  # do not retry the same files; the next change will
            log.error("reload refused, keeping the running configuration: %s", exc)
            print(f"pacsd: reload refused, keeping the running configuration: {exc}",
                  file=sys.stderr, flush=True)
            audit.record(audit.Event("config.reload"), audit.Outcome.SERIOUS, trigger=trigger,
                         error=str(exc)[:500], config=self.cfg.source)
            sd_notify("READY=1\nSTATUS=reload refused; running with the previous "
                      "configuration")
            return False
        self.cfg = new
        old_snapshot, self.snapshot = self.snapshot, snapshot
        self._files_seen = files_fingerprint(watched_files(new))
        if self.sequencer is not None:
            self.sequencer.reconfigure(new)  # new syslog target, format, alert thresholds
        replaced = 0
        for i, old in enumerate(list(self.workers)):
            fresh = self._spawn(old.index)
            try:
                self._wait_ready([fresh], WORKER_READY_TIMEOUT)
            except EnvironmentProblem as exc:
                log.error("reload: new worker failed (%s); keeping the old one", exc)
                self._kill_all([fresh])
                continue
            self.workers[i] = fresh
            with contextlib.suppress(ProcessLookupError):
                # retire: stop accepting; running associations finish, however long
                # (idle ones end at network_timeout); a later SIGTERM bounds it by the grace
                old.proc.send_signal(RETIRE_SIGNAL)
            self.retiring.append(old)
            replaced += 1
        if old_snapshot is not None:
            old_snapshot.close()  # running workers hold their own inherited copies
        self._watch.watch(watched_files(new))
        self.reloads += 1
        audit.record(audit.Event("config.reload"), audit.Outcome.SUCCESS, trigger=trigger,
                     config=new.source, workers=replaced)
        print(f"pacsd: reloaded ({trigger}); {replaced} worker(s) restarted", file=sys.stderr,
              flush=True)
        self._last_status = time.monotonic()
        sd_notify(f"READY=1\nSTATUS={self.status_line()}")
        return True

    def handle_term(self) -> int:
        """Stop accepting, let workers drain within shutdown_grace, then stop."""
        self._stopping = True
        grace = self.cfg.node.shutdown_grace
        sd_notify(f"STOPPING=1\nSTATUS=stopping: draining associations (up to {grace} s)")
        self._watch.stop()
        everyone = self.workers + self.retiring
        for w in everyone:
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(signal.SIGTERM)
        if self.sock is not None:
            self.sock.close()  # the workers' copies close as they exit
            self.sock = None
        deadline = time.monotonic() + grace + 5  # workers abort at `grace` themselves
        killed = 0
        for w in everyone:
            try:
                w.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
                killed += 1
        audit.record(audit.Event("app.stop"), audit.Outcome.SUCCESS if not killed
                     else audit.Outcome.MINOR, pid=os.getpid(), workers_killed=killed)
        return 0

    def _kill_all(self, workers: list[Worker]) -> None:
        for w in workers:
            with contextlib.suppress(ProcessLookupError):
                w.proc.kill()
            w.proc.wait()


def serve(cfg: Config) -> int:
    """Run the node in the foreground until SIGTERM/SIGINT; returns the exit code."""
    audit.configure_logging()
    sup = Supervisor(cfg)
    sup.prepare()
    sup.sequencer = audit.start_sequencer(cfg)
    try:
        return sup.run()
    finally:
        audit.shutdown(10.0)


# --------------------------------------------------------------------------- worker


def run_worker(cfg: Config, fd: int, index: int) -> int:
    """One worker: serve associations on the inherited socket until told to stop, then drain.

    SIGTERM (node stopping): running associations get [node] shutdown_grace seconds, then
    are aborted. RETIRE_SIGNAL (reload replaced this worker): they finish however long
    they take (idle ones end at network_timeout), unless a SIGTERM follows.
    """
    from pacsd import app

    audit.configure_logging()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides; Ctrl-C reaches it
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    stop = threading.Event()
    grace = float(cfg.node.shutdown_grace)
    deadline = [float("inf")]  # drain deadline (monotonic); SIGTERM bounds it by the grace

    def on_term(*_: object) -> None:
        deadline[0] = min(deadline[0], time.monotonic() + grace)
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(RETIRE_SIGNAL, lambda *_: stop.set())
    sock_path = os.environ.get("PACSD_AUDIT_SOCKET")
    if sock_path:
        audit.connect_worker(sock_path)
    try:
        listen_sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise EnvironmentProblem(f"worker {index}: bad listening socket fd {fd}: {exc}") from None
    server, services = app.build_server(cfg, listen_sock)
    thread = threading.Thread(target=server.serve_forever, name="accept", daemon=True)
    thread.start()
    box = None
    if index == 0 and cfg.inbox.directory:  # one inbox per node; its lock bridges reloads
        from pacsd.inbox import Inbox

        box = Inbox(cfg, services.store)
        box.start()
    ready_fd = os.environ.get("PACSD_READY_FD")
    if ready_fd:
        try:
            os.write(int(ready_fd), b"R")
            os.close(int(ready_fd))
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise
    parent = os.getppid()
    while not stop.wait(1.0):
        if os.getppid() != parent:  # the supervisor died: do not linger as an orphan
            break
    if box is not None:
        box.stop()  # finishes the file in hand
    if os.getppid() != parent:
        on_term()
    server.stop_accepting()
    while time.monotonic() < deadline[0]:
        if not server.running_associations():
            break
        time.sleep(0.05)
    aborted = server.drain(time.monotonic())  # abort whatever is still running
    if aborted:
        log.warning("worker %d aborted %d association(s) at the end of the grace period",
                    index, aborted)
    audit.shutdown(5.0)
    return 0
