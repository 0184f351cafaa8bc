"""The systemd unit, sysusers and tmpfiles files, and scripts/install (staged with --destdir).

systemd is not PID 1 in the test container, so only the offline analyses run here:
`systemd-analyze verify` and `systemd-analyze security --offline=yes`.
"""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from pacsd import config

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "pacsd.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed "
                                   "(Debian package systemd)")
MAX_EXPOSURE = 2.0


def _directives(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key, []).append(value)
    return out


def _staged(tmp_path: Path) -> Path:
    """scripts/install into a staging root; returns that root."""
    dest = tmp_path / "root"
    r = subprocess.run([str(ROOT / "scripts" / "install"), "--destdir", str(dest), "--no-venv",
                        "--listen", "0.0.0.0:2762"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return dest


def test_unit_declares_notify_reload_watchdog_and_hardening() -> None:
    d = _directives(UNIT)
    assert d["Type"] == ["notify"]
    assert d["ExecStartPre"][0].endswith("pacsd check-config")
    assert d["ExecStart"][0].endswith("pacsd serve")
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert int(d["WatchdogSec"][0]) > 0
    assert d["User"] == ["pacsd"] and d["UMask"] == ["0077"]
    assert d["StateDirectory"] == ["pacsd"] and d["ConfigurationDirectory"] == ["pacsd"]
    assert d["CapabilityBoundingSet"] == [""] and d["AmbientCapabilities"] == [""]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices",
                "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
                "ProtectControlGroups", "LockPersonality", "RestrictNamespaces",
                "RestrictRealtime"):
        assert d[key] == ["yes"], key
    assert d["ProtectSystem"] == ["strict"]
    assert set(d["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "@system-service" in d["SystemCallFilter"]


@needs_analyze
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    unit = _staged(tmp_path) / "etc" / "systemd" / "system" / "pacsd.service"
    r = subprocess.run([str(ANALYZE), "verify", str(unit)], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    lines = [line for line in (r.stdout + r.stderr).splitlines() if "pacsd.service" in line]
    assert r.returncode == 0 and not lines, r.stdout + r.stderr


@needs_analyze
def test_systemd_analyze_security_exposure(tmp_path: Path) -> None:
    r = subprocess.run([str(ANALYZE), "security", "--offline=yes", "--no-pager", str(UNIT)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    if "--offline" in r.stderr and ("unrecognized" in r.stderr or "unknown" in r.stderr):
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    m = re.search(r"Overall exposure level for pacsd\.service: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    exposure = float(m.group(1))
    print(f"systemd-analyze security --offline=yes: exposure {exposure}")
    assert exposure <= MAX_EXPOSURE, r.stdout


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None
                    or shutil.which("systemd-tmpfiles") is None,
                    reason="systemd-sysusers/systemd-tmpfiles not installed")
def test_sysusers_and_tmpfiles_apply_to_a_scratch_root(tmp_path: Path) -> None:
    root = tmp_path / "sysroot"
    (root / "etc").mkdir(parents=True)
    r = subprocess.run(["systemd-sysusers", f"--root={root}", str(ROOT / "systemd" /
                        "pacsd.sysusers")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    passwd = (root / "etc" / "passwd").read_text()
    assert re.search(r"(?m)^pacsd:x:\d+:\d+:.*:/var/lib/pacsd:/usr/sbin/nologin$", passwd)
    r = subprocess.run(["systemd-tmpfiles", f"--root={root}", "--create",
                        str(ROOT / "systemd" / "pacsd.tmpfiles")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE((root / "var" / "lib" / "pacsd").stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "etc" / "pacsd").stat().st_mode) == 0o750


def test_install_stages_unit_user_directories_and_a_config(tmp_path: Path) -> None:
    dest = _staged(tmp_path)
    assert (dest / "usr" / "lib" / "sysusers.d" / "pacsd.conf").exists()
    assert (dest / "usr" / "lib" / "tmpfiles.d" / "pacsd.conf").exists()
    unit = (dest / "etc" / "systemd" / "system" / "pacsd.service").read_text()
    assert "/usr/bin/pacsd" not in unit  # pointed at the pacsd that was installed
    cfg = config.load(dest / "etc" / "pacsd" / "pacsd.toml")
    assert cfg.node.listen == "0.0.0.0:2762"
    assert cfg.storage.root == "/var/lib/pacsd/objects"
    assert cfg.storage.index == "/var/lib/pacsd/index.sqlite"
    assert cfg.auth.database == "/var/lib/pacsd/users.sqlite"
    assert cfg.audit.spool == "/var/lib/pacsd/audit-spool"
    for key in ("server.key", "storage.key", "ca.key"):
        mode = stat.S_IMODE((dest / "etc" / "pacsd" / "tls" / key).stat().st_mode)
        assert mode == 0o600, key
    assert not (dest / "etc" / "pacsd" / "data").exists()

    # a second run upgrades the unit but never touches the configuration
    before = (dest / "etc" / "pacsd" / "pacsd.toml").read_bytes()
    r = subprocess.run([str(ROOT / "scripts" / "install"), "--destdir", str(dest),
                        "--no-venv"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (dest / "etc" / "pacsd" / "pacsd.toml").read_bytes() == before
