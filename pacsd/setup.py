"""First-run set-up: `init`, `cert issue` and `quickstart`."""

from __future__ import annotations

import re
import secrets
import shlex
import sys
from importlib import resources
from pathlib import Path

from pacsd import config as configmod
from pacsd import tls
from pacsd.errors import AlreadyExists, UsageError

DEMO_AE = "DEMO_MODALITY"
DEMO_USER = "demo"


def _template(ae_title: str, port: int, encryption: bool) -> str:
    text = resources.files("pacsd").joinpath("data/pacsd.toml").read_text(encoding="utf-8")
    text = re.sub(r'(?m)^ae_title = "PACSD"', f'ae_title = "{ae_title}"', text, count=1)
    text = re.sub(r'(?m)^listen = "127\.0\.0\.1:2762"', f'listen = "127.0.0.1:{port}"', text,
                  count=1)
    if encryption:
        text = re.sub(r"(?m)^encryption = false", "encryption = true", text, count=1)
    return text


def init_node(directory: Path, *, ae_title: str = "PACSD", port: int = 2762,
              encryption: bool = False) -> Path:
    """Create DIR/pacsd.toml, a development PKI, the storage key and empty databases.

    Refuses to overwrite an existing configuration (AlreadyExists); UsageError on bad values.
    """
    configmod.ae_title(ae_title, "--ae-title")
    if not 0 < port < 65536:
        raise UsageError(f"--port: {port} is out of range 1-65535")
    cfg_path = directory / "pacsd.toml"
    if cfg_path.exists():
        raise AlreadyExists(f"{cfg_path} exists; refusing to overwrite it")
    tls_dir = directory / "tls"
    for existing in ("ca.key", "server.key", "storage.key"):
        if (tls_dir / existing).exists():
            raise AlreadyExists(f"{tls_dir / existing} exists; refusing to overwrite it")
    directory.mkdir(parents=True, exist_ok=True)
    tls_dir.mkdir(mode=0o700, exist_ok=True)
    (directory / "data").mkdir(mode=0o700, exist_ok=True)
    tls.create_ca(tls_dir)
    tls.issue(tls_dir, ae_title, tls_dir / "server.pem", tls_dir / "server.key", server=True,
              days=825, hosts=tls.server_hosts())
    tls.write_private(tls_dir / "storage.key", secrets.token_bytes(32))
    cfg_path.write_text(_template(ae_title, port, encryption), encoding="utf-8")
    cfg = configmod.load(cfg_path)
    if encryption:  # the keyring now, not at the first `serve` (where it is only logged)
        from pacsd import audit, keys

        audit.start_standalone(cfg)
        try:
            keys.create_keyring(cfg.storage.keyring, keys.FileKEK.from_file(cfg.storage.key_file))
        finally:
            audit.shutdown(5.0)
    _create_databases(cfg)
    return cfg_path


def _create_databases(cfg: configmod.Config) -> None:
    from pacsd.auth.database import open_auth_db
    from pacsd.store.ingest import Store

    open_auth_db(cfg).close()
    Store.open(cfg).close()


def issue_client_cert(cfg: configmod.Config, name: str, out: Path, days: int, *,
                      server: bool = False, hosts: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """Issue OUT/NAME.pem and OUT/NAME.key (0600) from the development CA next to client_ca.

    With `server`, the certificate also carries serverAuth and the SANs in `hosts` (default
    localhost and 127.0.0.1), for peers that pacsd opens associations to.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise UsageError(f"{name!r}: use letters, digits, '_', '.', '-' (at most 64)")
    if not 1 <= days <= 3650:
        raise UsageError(f"--days: {days} is out of range 1-3650")
    out.mkdir(parents=True, exist_ok=True)
    cert, key = out / f"{name}.pem", out / f"{name}.key"
    if key.exists():
        raise AlreadyExists(f"{key} exists; refusing to overwrite it")
    if hosts and not server:
        raise UsageError("--san goes with --server")
    tls.issue(Path(cfg.tls.client_ca).parent, name, cert, key, server=server, days=days,
              hosts=hosts or (("localhost", "127.0.0.1") if server else ()))
    return cert, key


def write_demo_ct(path: Path) -> None:
    """Write a small synthetic CT image (an invented patient) to send in the demo."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "DEMO^PATIENT"
    ds.PatientID = "DEMO-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "DEMO1"
    ds.StudyID = "1"
    ds.StudyDescription = "pacsd quickstart demo"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Rows = 64
    ds.Columns = 64
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(64 * 64 * 2)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def quickstart(directory: Path, *, port: int, serve: bool) -> int:
    """`init` if needed, register a demo modality and user, print how to send, then serve."""
    directory = directory.resolve()
    cfg_path = directory / "pacsd.toml"
    if not cfg_path.exists():
        init_node(directory, port=port)
        print(f"created {cfg_path} and a development PKI in {directory / 'tls'}")
    cfg = configmod.load(cfg_path)
    clients = directory / "clients"
    cert, key = clients / f"{DEMO_AE}.pem", clients / f"{DEMO_AE}.key"

    from pacsd.auth import aes, operator
    from pacsd.auth.database import open_auth_db

    db = open_auth_db(cfg)
    from pacsd import audit

    audit.start_standalone(cfg)
    if not key.exists():
        issue_client_cert(cfg, DEMO_AE, clients, 365)
    if aes.get(DEMO_AE) is None:
        info = tls.read_cert(cert)
        aes.add(DEMO_AE, cert_sha256=info.sha256, cert_subject=info.subject,
                cert_not_after=info.not_after.isoformat(), permits=["echo", "store"],
                hosts=["127.0.0.1/32", "::1/128"])
        audit.record(audit.Event.ADMIN_AE, audit.Outcome.SUCCESS, action="add",
                     target_ae=DEMO_AE, operator=operator(), cert_sha256=info.sha256)
        print(f"registered the demo modality AE {DEMO_AE} bound to {cert}")
    cred_file = _demo_user(cfg, directory)
    audit.shutdown(5.0)
    db.close()
    sample = directory / "demo" / "ct.dcm"
    if not sample.exists():
        write_demo_ct(sample)
    host, cport = cfg.node.host, cfg.node.port
    tls_args = (f"+tls {shlex.quote(str(key))} {shlex.quote(str(cert))} "
                f"+cf {shlex.quote(cfg.tls.client_ca)}")
    print()
    print("Send an image as the demo modality (DCMTK):")
    print(f"  TCP_NODELAY=1 /usr/bin/storescu {tls_args} -aet {DEMO_AE} -aec {cfg.node.ae_title} "
          f"{host} {cport} {shlex.quote(str(sample))}")
    print("Check the connection:")
    print(f"  /usr/bin/echoscu {tls_args} -aet {DEMO_AE} -aec {cfg.node.ae_title} {host} {cport}")
    if cred_file:
        print(f"A demo user '{DEMO_USER}' (role workstation) was created; its password is in "
              f"{cred_file} (0600). Use it with storescu --user {DEMO_USER} --password ... "
              "on AEs registered with --require-user.")
    print(f"Verify the store at any time:  pacsd --config {cfg_path} verify")
    print()
    sys.stdout.flush()
    if not serve:
        return 0
    from pacsd import daemon

    return daemon.serve(cfg)


def _demo_user(cfg: configmod.Config, directory: Path) -> Path | None:
    """Create the demo user with a random password written to a 0600 file (never printed)."""
    from pacsd.auth import usercli, users

    cred = directory / "demo-user.txt"
    if cred.exists() or users.get(DEMO_USER) is not None:
        return cred if cred.exists() else None
    password = secrets.token_urlsafe(18)  # 24 random characters, never printed
    usercli.create_user(cfg, DEMO_USER, "workstation", password)
    tls.write_private(cred, f"{DEMO_USER}\n{password}\n".encode())
    return cred
