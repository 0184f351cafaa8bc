"""Process lifecycle: the supervisor (signals, sd_notify, reload, workers) and one worker.

`serve` is a small pre-fork supervisor in the style of gunicorn's arbiter: it binds the
port, starts `[node] workers` worker processes that inherit the listening socket and
accept on it, and owns what must have one owner: sd_notify, signals and reload, and the
audit sequencer (workers hand it their records over a local socket). Signal handlers
only queue the signal; the main loop dispatches (handle_hup, handle_term, ...).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from pacsd import audit
from pacsd import config as configmod
from pacsd.config import Config
from pacsd.errors import ConfigError, EnvironmentProblem, PacsdError

log = logging.getLogger("pacsd.daemon")

WORKER_READY_TIMEOUT = 60.0
WATCHDOG_INTERVAL = 5.0


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


class Supervisor:
    """Owns the listening socket, the workers, signals and reload."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.sock: socket.socket | None = None
        self.workers: list[Worker] = []
        self.retiring: list[Worker] = []
        self._signals: list[int] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False
        self.sequencer: audit.Sequencer | None = None

    # ---- set-up
    def prepare(self) -> None:
        """Validate everything a worker needs before binding; raises PacsdError."""
        from pacsd import app

        app.build_services(self.cfg).store.close()  # migrates DBs, sweeps the spool once
        self.sock = bind_listener(self.cfg)

    def _spawn(self, index: int) -> Worker:
        assert self.sock is not None
        ready_r, ready_w = os.pipe()
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)  # only the supervisor talks to systemd
        if self.sequencer is not None:
            env["PACSD_AUDIT_SOCKET"] = self.sequencer.socket_path
        env["PACSD_READY_FD"] = str(ready_w)
        cmd = [sys.executable, "-m", "pacsd", "--config", self.cfg.source, "_worker",
               "--fd", str(self.sock.fileno()), "--index", str(index)]
        proc = subprocess.Popen(cmd, pass_fds=(self.sock.fileno(), ready_w), env=env,
                                stdin=subprocess.DEVNULL)
        os.close(ready_w)
        return Worker(index=index, proc=proc, ready_fd=ready_r)

    def _wait_ready(self, workers: list[Worker], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = [w for w in workers if not w.ready]
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise EnvironmentProblem("workers did not become ready in time")
            r, _, _ = select.select([w.ready_fd for w in pending], [], [], min(left, 1.0))
            for w in pending:
                if w.ready_fd in r:
                    data = os.read(w.ready_fd, 16)
                    if not data:
                        raise EnvironmentProblem(
                            f"worker {w.index} exited during start-up (code "
                            f"{w.proc.wait()}); see the lines above")
                    w.ready = True
            pending = [w for w in pending if not w.ready]

    # ---- signals
    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)  # record only; the loop acts
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)

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
        audit.record(audit.Event("app.start"), audit.Outcome.SUCCESS, ae_title=self.cfg.node.ae_title,
                     listen=self.cfg.node.listen, workers=count, pid=os.getpid())
        print(f"pacsd: serving {self.cfg.node.ae_title} on {self.cfg.node.listen} "
              f"({count} worker{'s' if count != 1 else ''}, mutual TLS)", file=sys.stderr,
              flush=True)
        sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving on {self.cfg.node.listen}")
        last_ping = 0.0
        while True:
            with contextlib.suppress(InterruptedError):
                select.select([self._wake_r], [], [], 1.0)
            with contextlib.suppress(BlockingIOError, OSError):
                self._wake_r.setblocking(False)
                self._wake_r.recv(256)
            while self._signals:
                sig = self._signals.pop(0)
                if sig in (signal.SIGTERM, signal.SIGINT):
                    return self.handle_term()
                if sig == signal.SIGHUP:
                    self.handle_hup()
            self.reap()
            now = time.monotonic()
            if now - last_ping >= WATCHDOG_INTERVAL:
                sd_notify("WATCHDOG=1")
                last_ping = now

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

    def handle_hup(self) -> None:
        """Reload: validate the new config, then restart workers one at a time."""
        from pacsd import tls

        sd_notify("RELOADING=1")
        try:
            new = configmod.load(self.cfg.source)
            if new.node.listen != self.cfg.node.listen:
                raise ConfigError(f"{new.source}: node.listen changed; a restart is needed")
            tls.server_context(new)
        except PacsdError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            audit.record(audit.Event("config.reload"), audit.Outcome.SERIOUS, error=str(exc))
            sd_notify("READY=1\nSTATUS=reload refused; running with the previous configuration")
            return
        self.cfg = new
        if self.sequencer is not None:
            self.sequencer.reconfigure(new)  # new syslog target, format, alert thresholds
        for i, old in enumerate(list(self.workers)):
            fresh = self._spawn(old.index)
            try:
                self._wait_ready([fresh], WORKER_READY_TIMEOUT)
            except EnvironmentProblem as exc:
                log.error("reload: new worker failed (%s); keeping the old one", exc)
                self._kill_all([fresh])
                continue
            self.workers[i] = fresh
            old.proc.send_signal(signal.SIGTERM)  # drains: running associations finish
            self.retiring.append(old)
        audit.record(audit.Event("config.reload"), audit.Outcome.SUCCESS)
        sd_notify(f"READY=1\nSTATUS=serving on {self.cfg.node.listen} (reloaded)")

    def handle_term(self) -> int:
        """Stop accepting, let workers drain within shutdown_grace, then stop."""
        self._stopping = True
        sd_notify("STOPPING=1")
        everyone = self.workers + self.retiring
        for w in everyone:
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.cfg.node.shutdown_grace + 5
        for w in everyone:
            try:
                w.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
        if self.sock is not None:
            self.sock.close()
        audit.record(audit.Event("app.stop"), audit.Outcome.SUCCESS, pid=os.getpid())
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
    """One worker: serve associations on the inherited socket until SIGTERM, then drain."""
    from pacsd import app

    audit.configure_logging()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides; Ctrl-C reaches it
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    sock_path = os.environ.get("PACSD_AUDIT_SOCKET")
    if sock_path:
        audit.connect_worker(sock_path)
    try:
        listen_sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise EnvironmentProblem(f"worker {index}: bad listening socket fd {fd}: {exc}") from None
    server, _services = app.build_server(cfg, listen_sock)
    thread = threading.Thread(target=server.serve_forever, name="accept", daemon=True)
    thread.start()
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
    server.stop_accepting()
    aborted = server.drain(time.monotonic() + cfg.node.shutdown_grace)
    if aborted:
        log.warning("worker %d aborted %d association(s) at the end of the grace period",
                    index, aborted)
    audit.shutdown(5.0)
    return 0
