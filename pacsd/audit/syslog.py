"""RFC 5424 syslog messages and the four transports: unix datagram, UDP, TCP and TLS.

TCP and TLS frame each message by octet counting (RFC 6587 §3.4.1, RFC 5425 §4.3),
so a message of any length (32 KiB and more) arrives whole. A transport's send()
raises OSError when the message cannot be handed over; the sequencer then spools.
"""

from __future__ import annotations

import contextlib
import re
import select
import socket
import ssl
from typing import Protocol

from pacsd.config import parse_host_port

APP_NAME = "pacsd"

FACILITIES = {
    name: number
    for number, name in enumerate(
        ["kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron",
         "authpriv", "ftp"])
} | {f"local{i}": 16 + i for i in range(8)}

_NON_PRINT = re.compile(r"[^\x21-\x7e]")


def header_token(value: str, limit: int) -> str:
    """An RFC 5424 header field: PRINTUSASCII without spaces, at most `limit` chars, or '-'."""
    cleaned = _NON_PRINT.sub("_", value)[:limit]
    return cleaned or "-"


def format_message(*, facility: int, severity: int, timestamp: str, hostname: str,
                   procid: int | str, msgid: str, structured_data: str, msg: str) -> bytes:
    """One RFC 5424 message: <PRI>1 TIMESTAMP HOSTNAME pacsd PROCID MSGID SD MSG."""
    pri = facility * 8 + severity
    return (f"<{pri}>1 {timestamp} {header_token(hostname, 255)} {APP_NAME} "
            f"{header_token(str(procid), 128)} {header_token(msgid, 32)} {structured_data} "
            f"{msg}").encode()


def sd_escape(value: str) -> str:
    """Escape a structured-data PARAM-VALUE (RFC 5424 §6.3.3)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


class Transport(Protocol):
    description: str

    def send(self, msg: bytes) -> None: ...

    def alive(self) -> bool: ...

    def close(self) -> None: ...


class UnixTransport:
    """Datagrams to a local socket such as /dev/log."""

    def __init__(self, path: str, timeout: float) -> None:
        self.description = f"unix://{path}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except OSError:
            self._sock.close()
            raise

    def send(self, msg: bytes) -> None:
        self._sock.send(msg)

    def alive(self) -> bool:
        return True  # a datagram socket reports a dead reader on send()

    def close(self) -> None:
        self._sock.close()


class UDPTransport:
    """One datagram per message; delivery is not confirmed (prefer tcp:// or tls://)."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.description = f"udp://{host}:{port}"
        info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        self._sock = socket.socket(info[0], socket.SOCK_DGRAM)
        self._sock.settimeout(timeout)
        self._sock.connect(info[4])

    def send(self, msg: bytes) -> None:
        self._sock.send(msg)

    def alive(self) -> bool:
        return True

    def close(self) -> None:
        self._sock.close()


class StreamTransport:
    """TCP with octet-counting framing; `context` makes it TLS (RFC 5425)."""

    def __init__(self, host: str, port: int, timeout: float,
                 context: ssl.SSLContext | None = None) -> None:
        self.description = f"{'tls' if context else 'tcp'}://{host}:{port}"
        raw = socket.create_connection((host, port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if context is None:
            self._sock: socket.socket = raw
        else:
            try:
                self._sock = context.wrap_socket(raw, server_hostname=host)
            except (OSError, ssl.SSLError):
                raw.close()
                raise
        self._tls = context is not None
        self._timeout = timeout

    def send(self, msg: bytes) -> None:
        self._sock.sendall(b"%d " % len(msg) + msg)

    def alive(self) -> bool:
        """False once the collector closed the connection (it never sends us anything)."""
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
        except (OSError, ValueError):
            return False
        if not readable:
            return True
        if self._tls:
            self._sock.setblocking(False)
            try:
                data = self._sock.recv(1)
            except ssl.SSLWantReadError:
                return True
            except OSError:
                return False
            finally:
                with contextlib.suppress(OSError):
                    self._sock.settimeout(self._timeout)
            return bool(data)
        try:
            data = self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return bool(data)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if self._tls:
                self._sock.settimeout(0.5)
                self._sock = self._sock.unwrap()  # type: ignore[attr-defined]  # close_notify
        with contextlib.suppress(OSError):
            self._sock.close()


def tls_context(ca: str, cert: str = "", key: str = "") -> ssl.SSLContext:
    """Client context: the collector's certificate must chain to `ca` and match its name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=ca)
    if cert:
        ctx.load_cert_chain(cert, key or None)
    return ctx


def open_transport(url: str, *, ca: str = "", cert: str = "", key: str = "",
                   timeout: float = 5.0, context: ssl.SSLContext | None = None) -> Transport:
    """Connect to a syslog target URL; raises OSError (or ssl.SSLError) when it cannot."""
    scheme, _, rest = url.partition("://")
    if scheme == "unix":
        return UnixTransport(rest, timeout)
    host, port = parse_host_port(rest, "audit.syslog")
    if scheme == "udp":
        return UDPTransport(host, port, timeout)
    if scheme == "tcp":
        return StreamTransport(host, port, timeout)
    if scheme == "tls":
        return StreamTransport(host, port, timeout, context or tls_context(ca, cert, key))
    raise ValueError(f"unknown syslog scheme {scheme!r}")
