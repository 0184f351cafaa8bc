"""record(), per-association context, and the process's audit role (sequencer/worker/none).

Each process has one sink: the Sequencer (supervisor, or a one-shot command that
sequences under the chain lock), a WorkerClient (a worker, or a one-shot command while
the daemon runs), or, when nothing was started (unit tests, library use), a sink that
drops records. The sink is process state by nature, like the logging configuration.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import structlog

from pacsd.audit import chain
from pacsd.audit.events import CONTEXT_FIELDS, Event, Outcome, check_field
from pacsd.audit.sequencer import (
    Sequencer,
    WorkerClient,
    now_rfc3339,
    socket_live,
    socket_path_for,
    validate_forwarded,
)
from pacsd.config import Config
from pacsd.errors import EnvironmentProblem

_EMPTY: MappingProxyType[str, Any] = MappingProxyType({})
_context: ContextVar[MappingProxyType[str, Any]] = ContextVar("pacsd_audit_context",
                                                              default=_EMPTY)


class Sink(Protocol):
    def submit(self, rec: dict[str, Any]) -> None: ...

    def shutdown(self, timeout: float) -> None: ...


class NullSink:
    """No audit role was started in this process: records are checked, then dropped."""

    def submit(self, rec: dict[str, Any]) -> None:
        pass

    def shutdown(self, timeout: float) -> None:
        pass


class CaptureSink:
    """Keeps records in a list (for tests of code that emits audit events)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def submit(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)

    def shutdown(self, timeout: float) -> None:
        pass


_sink: Sink = NullSink()
_sink_lock = threading.Lock()


def _install(sink: Sink) -> None:
    global _sink
    with _sink_lock:
        old, _sink = _sink, sink
    if not isinstance(old, (NullSink, CaptureSink)) and old is not sink:
        old.shutdown(5.0)


# --------------------------------------------------------------------------- the API


def record(event: Event | str, outcome: Outcome | int = Outcome.SUCCESS, **fields: Any) -> None:
    """Audit one event with the bound association context; never blocks.

    Raises ValueError for an unknown event or outcome, a field whose name looks like a
    secret (password, passcode, totp, code, token, key, ...), a private key as a value,
    or a value that is not a JSON scalar or list of scalars.
    """
    ev = Event(event)
    out = Outcome(outcome)
    rec: dict[str, Any] = {"ts": now_rfc3339(), "event": ev.value, "outcome": int(out)}
    for key, value in _context.get().items():
        if value is not None:
            rec[key] = value
    for key, value in fields.items():
        rec[key] = check_field(key, value)
    _sink.submit(rec)


def _checked_context(ctx: dict[str, Any]) -> dict[str, Any]:
    for key, value in ctx.items():
        if key not in CONTEXT_FIELDS:
            raise ValueError(f"audit context {key!r} is not one of {', '.join(CONTEXT_FIELDS)}")
        if value is not None and not isinstance(value, (str, int)):
            raise ValueError(f"audit context {key!r}: {type(value).__name__} is not a string")
    return ctx


def bind(**ctx: Any) -> None:
    """Add to this thread's/task's audit context (assoc_id, source_ip, calling_ae, called_ae,
    user); also bound for diagnostic log lines. Raises ValueError for any other name."""
    _checked_context(ctx)
    _context.set(MappingProxyType({**_context.get(), **ctx}))
    structlog.contextvars.bind_contextvars(**ctx)


@contextlib.contextmanager
def association(**ctx: Any) -> Iterator[None]:
    """Bind the context of one association for the block; restored on exit.

    Raises ValueError for a name that is not a context field.
    """
    _checked_context(ctx)
    token = _context.set(MappingProxyType({**_context.get(), **ctx}))
    try:
        with structlog.contextvars.bound_contextvars(**ctx):
            yield
    finally:
        _context.reset(token)


def context() -> dict[str, Any]:
    """The currently bound audit context (a copy)."""
    return dict(_context.get())


@contextlib.contextmanager
def capture() -> Iterator[list[dict[str, Any]]]:
    """For tests: collect records emitted in this process in a list, instead of sending them."""
    sink = CaptureSink()
    global _sink
    with _sink_lock:
        old, _sink = _sink, sink
    try:
        yield sink.records
    finally:
        with _sink_lock:
            _sink = old


# --------------------------------------------------------------------------- process roles


def start_sequencer(cfg: Config) -> Sequencer:
    """Supervisor: own the chain, listen on socket_path_for(cfg) for workers, send to syslog.

    Raises EnvironmentProblem (spool unusable, chain held by another process, socket).
    """
    seq = Sequencer(cfg, listen=True)
    _install(seq)
    return seq


def connect_worker(socket_path: str) -> WorkerClient:
    """Worker: forward records to the supervisor's sequencer at socket_path (non-blocking)."""
    client = WorkerClient(socket_path)
    _install(client)
    return client


def start_standalone(cfg: Config, *, wait: float = 10.0) -> Sequencer | WorkerClient:
    """One-shot command: forward to a running sequencer, else sequence under the chain lock.

    Raises EnvironmentProblem when neither is possible within `wait` seconds.
    """
    path = socket_path_for(cfg)
    spool = Path(cfg.audit.spool)
    chain.ensure_spool(spool)
    deadline = time.monotonic() + wait
    sink: Sequencer | WorkerClient
    while True:
        if socket_live(path):
            sink = WorkerClient(path)
            break
        lock = chain.ChainLock(spool)
        if lock.try_acquire():
            sink = Sequencer(cfg, listen=False, lock=lock)
            break
        if time.monotonic() >= deadline:
            raise EnvironmentProblem(f"{spool}: the audit chain is locked and no sequencer "
                                     f"answers on {path}")
        time.sleep(0.1)
    _install(sink)
    atexit.register(shutdown, 5.0)
    return sink


def shutdown(timeout: float = 5.0) -> None:
    """Flush and stop this process's audit role (delivering or spooling what is queued)."""
    global _sink
    with _sink_lock:
        old, _sink = _sink, NullSink()
    old.shutdown(timeout)


def current() -> Sink:
    """This process's sink (tests and the daemon's status use it)."""
    return _sink


__all__ = [
    "CaptureSink", "NullSink", "association", "bind", "capture", "connect_worker", "context",
    "current", "record", "shutdown", "start_sequencer", "start_standalone",
    "validate_forwarded",
]
