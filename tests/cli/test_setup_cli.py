"""`pacsd init`, `cert issue`, `check-config`, `quickstart --no-serve` as a sysadmin runs them."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.conftest import pacsd_cmd


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(pacsd_cmd(*args), capture_output=True, text=True, timeout=120)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_init_writes_the_documented_files_with_private_keys_0600(tmp_path: Path) -> None:
    d = tmp_path / "node"
    r = run("init", str(d), "--ae-title", "ARCHIVE", "--port", "11999")
    assert r.returncode == 0, r.stderr
    for key in ("ca.key", "server.key", "storage.key"):
        assert mode(d / "tls" / key) == 0o600, key
    assert (d / "tls" / "storage.key").stat().st_size == 32
    text = (d / "pacsd.toml").read_text()
    assert 'ae_title = "ARCHIVE"' in text and 'listen = "127.0.0.1:11999"' in text
    server = x509.load_pem_x509_certificate((d / "tls" / "server.pem").read_bytes())
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku
    r = run("--config", str(d / "pacsd.toml"), "check-config")
    assert r.returncode == 0, r.stdout + r.stderr
    again = run("init", str(d))
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr


def test_cert_issue_client_and_server(tmp_path: Path) -> None:
    d = tmp_path / "node"
    assert run("init", str(d)).returncode == 0
    cfg = str(d / "pacsd.toml")
    r = run("--config", cfg, "cert", "issue", "CT1", "--out", str(tmp_path / "c"))
    assert r.returncode == 0, r.stderr
    assert mode(tmp_path / "c" / "CT1.key") == 0o600
    cert = x509.load_pem_x509_certificate((tmp_path / "c" / "CT1.pem").read_bytes())
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    r = run("--config", cfg, "cert", "issue", "DEST", "--server", "--san", "ws.example.org",
            "--out", str(tmp_path / "c"))
    assert r.returncode == 0, r.stderr
    cert = x509.load_pem_x509_certificate((tmp_path / "c" / "DEST.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["ws.example.org"]
    r = run("--config", cfg, "cert", "issue", "CT1", "--out", str(tmp_path / "c"))
    assert r.returncode == 2 and "refusing to overwrite" in r.stderr
    r = run("--config", cfg, "cert", "issue", "../evil", "--out", str(tmp_path / "c"))
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_check_config_reports_a_key_readable_by_others(tmp_path: Path) -> None:
    d = tmp_path / "node"
    assert run("init", str(d)).returncode == 0
    (d / "tls" / "storage.key").chmod(0o644)
    r = run("--config", str(d / "pacsd.toml"), "check-config")
    assert r.returncode == 1
    assert "storage.key" in r.stdout + r.stderr


def test_missing_config_is_one_line_exit_2(tmp_path: Path) -> None:
    r = run("--config", str(tmp_path / "nope.toml"), "check-config")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "nope.toml" in r.stderr


def test_quickstart_without_serving_prints_a_working_storescu_line(tmp_path: Path) -> None:
    d = tmp_path / "demo"
    r = run("quickstart", str(d), "--port", "11998", "--no-serve")
    assert r.returncode == 0, r.stderr
    assert "/usr/bin/storescu +tls" in r.stdout and "DEMO_MODALITY" in r.stdout
    cred = d / "demo-user.txt"
    assert mode(cred) == 0o600
    password = cred.read_text().splitlines()[1]
    assert password not in r.stdout + r.stderr  # the password is never printed
    listed = run("--config", str(d / "pacsd.toml"), "ae", "list")
    assert "DEMO_MODALITY" in listed.stdout
    # running it again reuses everything
    again = run("quickstart", str(d), "--port", "11998", "--no-serve")
    assert again.returncode == 0, again.stderr
