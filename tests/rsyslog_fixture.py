"""pytest plugin: a real, unprivileged rsyslogd on loopback for audit tests.

It listens on UDP (imudp), plain TCP (imptcp, octet-counted framing), TLS (imtcp with
the gtls driver, RFC 5425; client certificates required and checked against a CA made
for the test) and a unix datagram socket (imuxsock), and writes every message whose
APP-NAME is pacsd to one file, one RFC 5424 line per message, as rsyslog parsed it.

Fixtures: `rsyslog_pki` (session: CA, server and client certificates) and `rsyslog`
(a running daemon; `.stop()`, `.start()`, `.restart()`, `.wait_lines(n)`, `.lines()`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"

RFC5424_RE = re.compile(
    r"^<(?P<pri>\d{1,3})>1 (?P<ts>\S+) (?P<host>\S+) (?P<app>\S+) (?P<procid>\S+) "
    r"(?P<msgid>\S+) (?P<sd>-|(?:\[(?:[^\]\\]|\\.)*\])+) (?P<msg>.*)$"
)


def parse_rfc5424(line: str) -> dict[str, Any]:
    """Split one RFC 5424 line; `body` is the JSON object when the MSG is JSON."""
    m = RFC5424_RE.match(line.rstrip("\n"))
    if not m:
        raise AssertionError(f"not an RFC 5424 line: {line[:200]!r}")
    out: dict[str, Any] = m.groupdict()
    out["pri"] = int(out["pri"])
    out["facility"], out["severity"] = divmod(out["pri"], 8)
    if out["msg"].startswith("{"):
        out["body"] = json.loads(out["msg"])
    return out


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- test PKI


@dataclass(frozen=True)
class PKI:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: verifying against it must fail


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _leaf(cn: str, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
          server: bool) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False,
                                            crl_sign=False, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([
                   ExtendedKeyUsageOID.SERVER_AUTH if server
                   else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca_key.public_key()), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_pki(directory: Path) -> PKI:
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _ca("pacsd test syslog CA")
    other, _ = _ca("unrelated CA")
    srv, srv_key = _leaf("127.0.0.1", ca, ca_key, server=True)
    cli, cli_key = _leaf("pacsd-audit-client", ca, ca_key, server=False)
    pem = serialization.Encoding.PEM
    pki = PKI(directory / "ca.pem", directory / "server.pem", directory / "server.key",
              directory / "client.pem", directory / "client.key", directory / "other-ca.pem")
    pki.ca.write_bytes(ca.public_bytes(pem))
    pki.other_ca.write_bytes(other.public_bytes(pem))
    pki.server_cert.write_bytes(srv.public_bytes(pem))
    pki.client_cert.write_bytes(cli.public_bytes(pem))
    _write_key(srv_key, pki.server_key)
    _write_key(cli_key, pki.client_key)
    return pki


# --------------------------------------------------------------------------- the daemon

# the whole message as rsyslog parsed it, RFC 5424 again (rsyslog's SyslogProtocol23Format)
_TEMPLATE = ("<%PRI%>1 %TIMESTAMP:::date-rfc3339% %HOSTNAME% %APP-NAME% %PROCID% %MSGID% "
             "%STRUCTURED-DATA% %msg%\\n")
_CONF = """\
global(workDirectory="{work}" maxMessageSize="64k"
       defaultNetstreamDriverCAFile="{ca}"
       defaultNetstreamDriverCertFile="{cert}"
       defaultNetstreamDriverKeyFile="{key}")
module(load="imudp")
module(load="imptcp")
module(load="imuxsock" SysSock.Use="off")
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1"
       StreamDriver.AuthMode="x509/certvalid")
input(type="imudp" address="127.0.0.1" port="{udp}")
input(type="imptcp" address="127.0.0.1" port="{tcp}")
input(type="imtcp" address="127.0.0.1" port="{tls}")
input(type="imuxsock" Socket="{unix}" UseSpecialParser="off" ParseHostname="on"
      IgnoreTimestamp="off")
template(name="rfc5424line" type="string"
         string="{template}")
if $app-name == "pacsd" then {{
  action(type="omfile" file="{log}" template="rfc5424line")
  stop
}}
action(type="omfile" file="{other}")
"""


class Rsyslog:
    """One rsyslogd on loopback; ports stay the same across stop()/start()."""

    def __init__(self, directory: Path, pki: PKI) -> None:
        self.dir = directory
        self.pki = pki
        self.work = directory / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.log = directory / "audit.log"
        self.other = directory / "other.log"
        self.unix_path = str(directory / "log.sock")
        self.udp_port = free_port(socket.SOCK_DGRAM)
        self.tcp_port = free_port()
        self.tls_port = free_port()
        self.conf = directory / "rsyslog.conf"
        self.pidfile = directory / "rsyslogd.pid"
        self.conf.write_text(_CONF.format(
            work=self.work, ca=pki.ca, cert=pki.server_cert, key=pki.server_key,
            udp=self.udp_port, tcp=self.tcp_port, tls=self.tls_port, unix=self.unix_path,
            log=self.log, other=self.other, template=_TEMPLATE))
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr = directory / "rsyslogd.stderr"

    def url(self, kind: str) -> str:
        return {"udp": f"udp://127.0.0.1:{self.udp_port}",
                "tcp": f"tcp://127.0.0.1:{self.tcp_port}",
                "tls": f"tls://127.0.0.1:{self.tls_port}",
                "unix": f"unix://{self.unix_path}"}[kind]

    def start(self, timeout: float = 15.0) -> None:
        assert self.proc is None, "already running"
        err = open(self.stderr, "ab")  # noqa: SIM115 - lives as long as the daemon
        self.proc = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(self.pidfile)],
            stdout=err, stderr=err, cwd=self.dir)
        err.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rsyslogd exited: {self.stderr.read_text()[-2000:]}")
            if (self._accepts(self.tcp_port) and self._accepts(self.tls_port)
                    and Path(self.unix_path).exists()):
                time.sleep(0.2)  # imudp starts with the others; give it a beat
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("rsyslogd did not start listening in time")

    @staticmethod
    def _accepts(port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None
        for stale in (self.unix_path,):
            if os.path.exists(stale):  # noqa: PTH110 - a socket path string
                os.unlink(stale)  # noqa: PTH108

    def restart(self) -> None:
        self.stop()
        self.start()

    def lines(self) -> list[str]:
        try:
            return self.log.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []

    def wait_lines(self, count: int, timeout: float = 20.0) -> list[str]:
        """Wait until the file holds at least `count` lines; returns them (may be fewer)."""
        deadline = time.monotonic() + timeout
        got = self.lines()
        while len(got) < count and time.monotonic() < deadline:
            time.sleep(0.05)
            got = self.lines()
        return got


@pytest.fixture(scope="session")
def rsyslog_pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("syslog-pki"))


@pytest.fixture
def rsyslog(tmp_path_factory: pytest.TempPathFactory, rsyslog_pki: PKI) -> Iterator[Rsyslog]:
    if not Path(RSYSLOGD).exists():
        pytest.fail("rsyslogd is not installed (scripts/test installs it)")
    d = tmp_path_factory.mktemp("rsyslog")
    daemon = Rsyslog(d, rsyslog_pki)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
