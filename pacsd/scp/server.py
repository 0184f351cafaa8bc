"""The association server: TLS per connection with a deadline, then the admission gates.

pynetdicom 3.0.4 wraps accepted sockets with `do_handshake_on_connect=True` in the accept
thread, so one silent client stalls every new association. Here `get_request` returns
the plain socket and the handshake runs in the connection's own thread, bounded by
`acse_timeout` (DESIGN §4 gate 2).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import socket
import socketserver
import ssl
import threading
import time
from pathlib import Path
from typing import Any

from pynetdicom import evt
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from pacsd.scp.state import Services

log = logging.getLogger("pacsd.server")


class AssociationSlots:
    """At most `limit` associations across all worker processes.

    Slot i is byte i of a lock file, held with an fcntl record lock for the life of the
    association. The kernel releases a dead worker's locks, so a crash never leaks a slot.
    fcntl locks belong to the process, so threads of one process also track their slots.
    """

    def __init__(self, path: Path, limit: int) -> None:
        self.limit = limit
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._held: set[int] = set()
        self._mutex = threading.Lock()

    def acquire(self) -> int | None:
        with self._mutex:
            for i in range(self.limit):
                if i in self._held:
                    continue
                try:
                    fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, i)
                except OSError:
                    continue
                self._held.add(i)
                return i
        return None

    def release(self, slot: int) -> None:
        with self._mutex:
            if slot in self._held:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, slot)
                self._held.discard(slot)

    def in_use_here(self) -> int:
        return len(self._held)


class NodeRequestHandler(RequestHandler):
    """Runs in the connection's thread: finish TLS, then the pynetdicom association."""

    server: NodeServer

    def handle(self) -> None:
        srv = self.server
        services = srv.services
        ip = str(self.client_address[0])
        raw: socket.socket = self.request
        ctx = services.tls_context()
        try:
            tls_sock = ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            _handshake(tls_sock, services.cfg.node.acse_timeout)
        except (ssl.SSLError, OSError) as exc:
            reason = _handshake_reason(exc)
            log.info("tls handshake failed from %s: %s", ip, reason)
            services.refuse(ip, gate="tls", reason=reason)
            _close(raw)
            return
        # each blocking send/recv is bounded (pynetdicom's own server does the same); the
        # receive path also bounds a whole PDU by it (tuning._socket_recv)
        tls_sock.settimeout(services.cfg.node.network_timeout)
        self.request = tls_sock
        state = services.new_connection(ip, int(self.client_address[1]), tls_sock)
        try:
            assoc = self._create_association()
            assoc.pacsd_state = state  # type: ignore[attr-defined]
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            assoc.join()
            _flushed(assoc)
            _drop_partial(assoc)
        finally:
            services.connection_closed(state)
            _close(tls_sock)


def _drop_partial(assoc: Any) -> None:
    """Remove the spool file of a C-STORE the peer never finished (connection lost or
    timed out mid-dataset). Left to the garbage collector, its descriptor and temp file
    outlived the association (issue 9: seen after a 1 byte/s C-STORE was cut off)."""
    msg = getattr(getattr(assoc, "dimse", None), "message", None)
    spool = getattr(msg, "_data_set_file", None)
    if spool is not None and hasattr(spool, "abort"):
        with contextlib.suppress(Exception):
            spool.abort()
    fast = getattr(assoc, "pacsd_fast", None)  # scp/faststore.py
    if fast is not None:
        with contextlib.suppress(Exception):
            fast.close()


def _flushed(assoc: Any, timeout: float = 2.0) -> None:
    """Wait (bounded) until the DUL thread has sent what the association queued last.

    On a rejection pynetdicom's association thread ends as soon as it has *queued* the
    A-ASSOCIATE-RJ; closing then raced the DUL thread that sends it (issue 9: a raw
    client saw the RJ in ~40 % of rejections, and three in thirty arrived in plaintext
    inside the TLS stream, after SSLSocket.shutdown had dropped the TLS state).
    The sending action runs before the state machine moves to Sta13 or Sta1.
    """
    dul = assoc.dul
    deadline = time.monotonic() + timeout
    while (dul.is_alive() and dul.state_machine.current_state not in ("Sta1", "Sta13")
           and time.monotonic() < deadline):
        time.sleep(0.002)


def _handshake(sock: ssl.SSLSocket, timeout: float) -> None:
    """The TLS handshake with one deadline for all of it: a peer trickling its
    ClientHello a byte at a time must not outlast `timeout` (a per-read timeout would
    let it). poll(), not select(): descriptors may exceed FD_SETSIZE."""
    deadline = time.monotonic() + timeout
    sock.settimeout(0.0)
    poller = select.poll()
    while True:
        try:
            sock.do_handshake()
            return
        except ssl.SSLWantReadError:
            mask = select.POLLIN
        except ssl.SSLWantWriteError:
            mask = select.POLLOUT
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("handshake timed out")
        poller.register(sock, mask)
        poller.poll(left * 1000)
        poller.unregister(sock)


def _handshake_reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "handshake timed out"
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    return str(exc) or exc.__class__.__name__


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


# How long a worker waits, per association it runs, before accepting a new connection.
ACCEPT_DEFER = 0.002


class NodeServer(ThreadedAssociationServer):
    """A pynetdicom server on an already-bound listening socket inherited from the supervisor."""

    daemon_threads = True

    def __init__(self, ae: Any, listen_sock: socket.socket, services: Services,
                 handlers: list[Any]) -> None:
        self._listen_sock = listen_sock
        listen_sock.setblocking(False)  # see get_request
        self.services = services
        self._workers = services.cfg.node.worker_count()
        address = listen_sock.getsockname()[:2]
        super().__init__(ae, address, services.cfg.node.ae_title, ae.supported_contexts,
                         None, handlers, request_handler=NodeRequestHandler)

    def server_bind(self) -> None:
        if self.socket is not None:
            self.socket.close()
        self.socket = self._listen_sock
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """The supervisor already called listen()."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept one connection; a worker that already runs associations first lets a
        less busy one take it.

        Every worker's accept thread wakes for a new connection; left to that race, four
        concurrent modalities ended up three on one worker and one on the other (CPU
        ticks 126 vs 54). Waiting ACCEPT_DEFER per association held hands the connection
        to the worker holding the fewest. The listening socket is non-blocking in every
        worker, so the losers' accept() fails at once (socketserver ignores the OSError).
        """
        assert self.socket is not None
        held = self.services.slots.in_use_here()
        if held and self._workers > 1:
            time.sleep(min(held, 16) * ACCEPT_DEFER)
        sock, addr = self.socket.accept()
        sock.setblocking(True)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, addr

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Gate 1: new connections from a blocked source are closed at accept."""
        ip = str(client_address[0])
        if self.services.source_blocked(ip):
            self.services.refuse(ip, gate="source_blocked", reason="source address blocked")
            return False
        return True

    def shutdown_request(self, request: Any) -> None:
        """Not here: pynetdicom calls this from the association thread right after queueing
        an A-ASSOCIATE-RJ, before the DUL thread sent it; NodeRequestHandler.handle closes
        the connection once the association is over and the DUL has flushed. Plain
        sockets (a source refused at accept, socketserver's own call) are closed here."""
        if not isinstance(request, ssl.SSLSocket):
            _close(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("unhandled error on connection from %s", client_address)

    def stop_accepting(self) -> None:
        """Stop the accept loop; running associations continue."""
        # BaseServer's, not AssociationServer.shutdown (next in the MRO): that one calls
        # server_close(), whose shutdown(SHUT_RDWR) stops the listening socket that the
        # supervisor and every other worker share.
        socketserver.BaseServer.shutdown(self)

    def running_associations(self) -> list[Any]:
        """Established associations still running (what a graceful stop waits for)."""
        return [a for a in self.active_associations if a.is_alive() and a.is_established]

    def drain(self, deadline: float) -> int:
        """Wait until no established association is running or `deadline` (monotonic) passes;
        abort the rest. Returns how many established associations had to be aborted.

        Connections that never became an association (still before or inside the
        A-ASSOCIATE exchange, or whose peer already went away) carry no work to finish:
        they are not waited for (pynetdicom would otherwise hold their thread for up to
        acse_timeout) and die with the worker.
        """
        import time

        while time.monotonic() < deadline:
            if not self.running_associations():
                return 0
            time.sleep(0.05)
        left = self.running_associations()
        for a in left:
            a.abort()
        return len(left)
