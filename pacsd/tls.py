"""TLS: server and client contexts, peer-certificate helpers, and the development PKI.

Only BCP 195 suites are offered: ECDHE key exchange with AES-GCM or ChaCha20-Poly1305
(TLS 1.2) and the TLS 1.3 AEAD suites. No CBC, no static RSA key exchange, no
compression, no renegotiation. Client certificates are always required.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pacsd.config import Config
from pacsd.errors import EnvironmentProblem

# OpenSSL cipher string for TLS 1.2 (TLS 1.3 suites are all AEAD and stay at defaults).
BCP195_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _harden(ctx: ssl.SSLContext, min_version: str) -> None:
    ctx.minimum_version = _VERSIONS[min_version]
    ctx.set_ciphers(BCP195_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ctx.options |= ssl.OP_SINGLE_ECDH_USE


def _load_chain(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise EnvironmentProblem(f"{exc.filename or cert}: certificate or key file not found") \
            from None
    except (ssl.SSLError, OSError) as exc:
        raise EnvironmentProblem(
            f"{cert}: cannot load certificate/key pair ({key}): {exc}"
        ) from None


def _load_ca(ctx: ssl.SSLContext, ca: str) -> None:
    try:
        ctx.load_verify_locations(cafile=ca)
    except FileNotFoundError:
        raise EnvironmentProblem(f"{ca}: CA file not found") from None
    except (ssl.SSLError, OSError) as exc:
        raise EnvironmentProblem(f"{ca}: cannot load CA certificates: {exc}") from None


def server_context(cfg: Config) -> ssl.SSLContext:
    """Mutual-TLS server context from [tls]; raises EnvironmentProblem naming the bad file."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx, cfg.tls.min_version)
    _load_chain(ctx, cfg.tls.cert, cfg.tls.key)
    _load_ca(ctx, cfg.tls.client_ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def client_context(cfg: Config, server_ca: str | None = None) -> ssl.SSLContext:
    """Client context presenting our server certificate (C-MOVE sub-associations)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx, cfg.tls.min_version)
    _load_chain(ctx, cfg.tls.cert, cfg.tls.key)
    _load_ca(ctx, server_ca or cfg.tls.client_ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = False  # peers are identified by registered address + chain
    return ctx


def fingerprint_der(der: bytes) -> str:
    """SHA-256 fingerprint of a DER certificate, lower-case hex."""
    return hashlib.sha256(der).hexdigest()


def peer_fingerprint(sock: socket.socket) -> str | None:
    """SHA-256 of the peer's certificate on an SSL socket, or None."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    der = sock.getpeercert(binary_form=True)
    return fingerprint_der(der) if der else None


@dataclass(frozen=True)
class CertInfo:
    sha256: str
    subject: str
    not_after: dt.datetime
    not_before: dt.datetime


def read_cert(path: Path) -> CertInfo:
    """Read the first certificate in a PEM (or DER) file; raises EnvironmentProblem."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise EnvironmentProblem(f"{path}: cannot read certificate: {exc.strerror}") from None
    try:
        cert = (x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data
                else x509.load_der_x509_certificate(data))
    except ValueError:
        raise EnvironmentProblem(f"{path}: not a PEM or DER X.509 certificate") from None
    return CertInfo(
        sha256=fingerprint_der(cert.public_bytes(serialization.Encoding.DER)),
        subject=cert.subject.rfc4514_string(),
        not_after=cert.not_valid_after_utc,
        not_before=cert.not_valid_before_utc,
    )


def check_files(cfg: Config) -> list[str]:
    """Problems with the configured certificates: missing, expired, key mismatch, chain."""
    problems: list[str] = []
    now = dt.datetime.now(dt.UTC)
    for label, p in (("tls.cert", cfg.tls.cert), ("tls.client_ca", cfg.tls.client_ca)):
        try:
            info = read_cert(Path(p))
        except EnvironmentProblem as exc:
            problems.append(f"{label}: {exc}")
            continue
        if info.not_after < now:
            problems.append(f"{label}: {p}: certificate expired on {info.not_after:%Y-%m-%d}")
        elif info.not_after < now + dt.timedelta(days=30):
            problems.append(f"{label}: {p}: certificate expires soon ({info.not_after:%Y-%m-%d})")
    if not problems:
        try:
            server_context(cfg)
        except EnvironmentProblem as exc:
            problems.append(f"tls: {exc}")
        else:
            if not _chains_to(Path(cfg.tls.cert), Path(cfg.tls.client_ca)):
                problems.append(
                    f"tls.cert: {cfg.tls.cert} is not issued by the CA in {cfg.tls.client_ca} "
                    "(peers that trust that CA will refuse it)"
                )
    return problems


def _chains_to(cert_path: Path, ca_path: Path) -> bool:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    for ca in x509.load_pem_x509_certificates(ca_path.read_bytes()):
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue  # not issued by this CA; try the next one in the file
        return True
    return False


# --------------------------------------------------------------------------- development PKI


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to a new file created 0600 (never world-readable, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    path.chmod(0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(cn: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pacsd development PKI"),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def create_ca(tls_dir: Path, days: int = 3650) -> None:
    """Create tls_dir/ca.pem and tls_dir/ca.key (0600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = _name("pacsd development CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(tls_dir / "ca.key", _key_pem(key))
    (tls_dir / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def issue(
    tls_dir: Path,
    cn: str,
    out_cert: Path,
    out_key: Path,
    *,
    server: bool,
    days: int = 365,
    hosts: tuple[str, ...] = (),
) -> CertInfo:
    """Issue a leaf certificate from tls_dir/ca.{pem,key}; key written 0600.

    Server certificates carry both serverAuth and clientAuth (pacsd presents its server
    certificate as a client for C-MOVE sub-associations). Raises EnvironmentProblem.
    """
    try:
        ca_cert = x509.load_pem_x509_certificate((tls_dir / "ca.pem").read_bytes())
        ca_key = serialization.load_pem_private_key((tls_dir / "ca.key").read_bytes(), None)
    except FileNotFoundError as exc:
        raise EnvironmentProblem(f"{exc.filename}: development CA not found") from None
    except ValueError as exc:
        raise EnvironmentProblem(f"{tls_dir}: cannot load the development CA: {exc}") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise EnvironmentProblem(f"{tls_dir / 'ca.key'}: expected an EC private key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=True,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if server or hosts:
        names: list[x509.GeneralName] = []
        for h in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                names.append(x509.DNSName(h))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    write_private(out_key, _key_pem(key))
    out_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return CertInfo(
        sha256=fingerprint_der(cert.public_bytes(serialization.Encoding.DER)),
        subject=cert.subject.rfc4514_string(),
        not_after=cert.not_valid_after_utc,
        not_before=cert.not_valid_before_utc,
    )


def server_hosts() -> tuple[str, ...]:
    """Names for the server certificate's SAN: localhost, loopback, this host's name."""
    names = ["localhost", "127.0.0.1", "::1"]
    host = socket.gethostname()
    if host and host not in names:
        names.append(host)
    return tuple(names)
