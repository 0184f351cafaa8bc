"""Fixtures: a real pacsd daemon as a subprocess on a free loopback port, with a PKI per test.

`node_factory(**overrides)` runs `pacsd init` in a temp dir, applies config overrides,
and returns a Node; `node` is a started one. Node.add_client() issues a client
certificate and registers its AE with `pacsd ae add`, exactly as a sysadmin would.
Audit records go to a unix datagram socket owned by the test (AuditSink), so every test
can assert on them; tests of the syslog transports use a real rsyslog (rsyslog_fixture).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest_plugins: list[str] = []
if (Path(__file__).parent / "rsyslog_fixture.py").exists():
    pytest_plugins.append("tests.rsyslog_fixture")


def _fix_client_reactor() -> None:
    """The tests' pynetdicom clients get the node's fix for pynetdicom's own reactor race
    (it can swallow the response its caller waits for; scp/tuning.fix_reactor_race)."""
    from pacsd.scp import tuning

    tuning.fix_reactor_race()


_fix_client_reactor()

# pynetdicom's pip package installs its own echoscu/storescu/... scripts, which can shadow
# DCMTK's on PATH; always run DCMTK's from the Debian package's directory.
DCMTK_DIR = "/usr/bin"
DCMTK = shutil.which("storescu", path=DCMTK_DIR) is not None


def dcmtk_path(tool: str) -> str:
    return shutil.which(tool, path=DCMTK_DIR) or f"{DCMTK_DIR}/{tool}"
needs_dcmtk = pytest.mark.skipif(not DCMTK, reason="DCMTK not installed (scripts/test installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pacsd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pacsd", *args]


class DatagramCollector:
    """A unix datagram socket at `path` that keeps every message it receives (a thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, OSError):
                continue
            self.messages.append(data.decode("utf-8", "replace"))

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


class AuditSink(DatagramCollector):
    """Stands in for /dev/log; collects RFC 5424 lines and parses their JSON bodies."""

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in list(self.messages):
            i = line.find("{")
            if i < 0:
                continue
            with contextlib.suppress(ValueError):
                out.append(json.loads(line[i:]))
        return out

    def wait_for(self, pred: Any, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Records matching `pred`, waiting until at least one exists."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.records() if pred(r)]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


@dataclass
class Client:
    title: str
    cert: Path
    key: Path


class Node:
    """A pacsd node directory and (when started) its daemon process."""

    def __init__(self, base: Path, *, ae_title: str = "PACSD", **overrides: Any) -> None:
        self.dir = base / "node"
        self.port = free_port()
        self.ae_title = ae_title
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = base / "pacsd.log"
        self.clients_dir = base / "clients"
        base.mkdir(parents=True, exist_ok=True)
        # unix socket paths are limited to 107 bytes; pytest's tmp paths can be longer
        self._sock_dir = Path(tempfile.mkdtemp(prefix="pacsd-audit-"))
        self.audit = AuditSink(self._sock_dir / "log.sock")
        r = self.cli("init", str(self.dir), "--ae-title", ae_title, "--port", str(self.port),
                     config=False)
        assert r.returncode == 0, r.stderr
        defaults = {("audit", "syslog"): f"unix://{self.audit.path}",
                    ("node", "workers"): 1,
                    ("storage", "min_free_mb"): 16}
        defaults.update({tuple(k.split(".", 1)): v for k, v in overrides.items()})  # type: ignore[misc]
        for (section, key), value in defaults.items():
            self.set_config(section, key, value)

    @property
    def cfg_path(self) -> Path:
        return self.dir / "pacsd.toml"

    @property
    def ca(self) -> Path:
        return self.dir / "tls" / "ca.pem"

    @property
    def objects(self) -> Path:
        return self.dir / "data" / "objects"

    # ---- config
    def set_config(self, section: str, key: str, value: Any) -> None:
        """Set `key` in [section] of pacsd.toml (adding the line if absent)."""
        text = self.cfg_path.read_text()
        rendered = json.dumps(value) if not isinstance(value, bool) else str(value).lower()
        sec = re.search(rf"(?m)^\[{re.escape(section)}\][^\n]*\n", text)
        assert sec, f"no [{section}] in config"
        start = sec.end()
        nxt = re.search(r"(?m)^\[", text[start:])
        end = start + nxt.start() if nxt else len(text)
        body = text[start:end]
        pat = re.compile(rf"(?m)^{re.escape(key)}\s*=.*$")
        if pat.search(body):
            body = pat.sub(f"{key} = {rendered}", body, count=1)
        else:
            body = f"{key} = {rendered}\n" + body
        self.cfg_path.write_text(text[:start] + body + text[end:])

    # ---- commands
    def cli(self, *args: str, input: str | None = None, config: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = pacsd_cmd("--config", str(self.cfg_path), *args) if config else pacsd_cmd(*args)
        return subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)

    def add_client(self, title: str, *, permits: str = "echo,store", extra: tuple[str, ...] = (),
                   register: bool = True) -> Client:
        """Issue a client certificate for `title` and (optionally) register the AE."""
        r = self.cli("cert", "issue", title, "--out", str(self.clients_dir))
        assert r.returncode == 0, r.stderr
        c = Client(title, self.clients_dir / f"{title}.pem", self.clients_dir / f"{title}.key")
        if register:
            r = self.cli("ae", "add", title, "--cert", str(c.cert), "--permit", permits, *extra)
            assert r.returncode == 0, r.stderr
        return c

    def tls_args(self, client: Client) -> list[str]:
        """DCMTK +tls arguments for `client`."""
        return ["+tls", str(client.key), str(client.cert), "+cf", str(self.ca)]

    def ssl_context(self, client: Client) -> ssl.SSLContext:
        """A pynetdicom client SSLContext presenting `client`'s certificate."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        ctx.check_hostname = False
        ctx.load_cert_chain(str(client.cert), str(client.key))
        return ctx

    def dcmtk(self, tool: str, client: Client, *args: str, calling: str | None = None,
              called: str | None = None, timeout: float = 300, tls: bool = True,
              env: dict[str, str] | None = None,
              files: list[Path] | tuple[Path, ...] = ()) -> subprocess.CompletedProcess[str]:
        """Run a DCMTK tool: options in `args`, then peer and port, then `files`."""
        cmd = [dcmtk_path(tool), *(self.tls_args(client) if tls else []),
               "-aet", calling or client.title, "-aec", called or self.ae_title,
               *args, "127.0.0.1", str(self.port), *[str(f) for f in files]]
        e = {**os.environ, "TCP_NODELAY": "1", **(env or {})}
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e)

    # ---- process
    def start(self, timeout: float = 60) -> None:
        """Start `pacsd serve` and wait for its ready line (another port if ours was taken)."""
        for _attempt in range(3):
            if self._start_once(timeout):
                return
            # free_port() races with other processes: take another port and try again
            self.port = free_port()
            self.set_config("node", "listen", f"127.0.0.1:{self.port}")
        raise RuntimeError(f"pacsd could not bind a free port:\n{self.log_text()}")

    def _start_once(self, timeout: float) -> bool:
        assert self.proc is None or self.proc.poll() is not None
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self._log_offset = self.log_path.stat().st_size
        self.proc = subprocess.Popen(pacsd_cmd("--config", str(self.cfg_path), "serve"),
                                     stdout=self._log, stderr=self._log,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()
            if "pacsd: serving" in text:
                return True
            if self.proc.poll() is not None:
                self._log.close()
                if "cannot bind" in text:
                    return False
                raise RuntimeError(f"pacsd exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        raise RuntimeError(f"pacsd did not become ready:\n{self.log_text()}")

    def log_text(self) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(self._log_offset)
            return f.read().decode("utf-8", "replace")

    def stop(self, timeout: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        """SIGKILL the whole process group (supervisor and workers) at once."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
            self._log.close()

    def pids(self) -> list[int]:
        """Supervisor and worker pids (the process group)."""
        assert self.proc is not None
        out = subprocess.run(["pgrep", "-g", str(self.proc.pid)], capture_output=True,
                             text=True).stdout
        return [int(p) for p in out.split()]

    def close(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.stop(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()
        finally:
            if self.proc is not None and self.proc.poll() is None:
                self.kill()
            self.audit.close()
            shutil.rmtree(self._sock_dir, ignore_errors=True)


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Any]:
    nodes: list[Node] = []

    def make(start: bool = True, **overrides: Any) -> Node:
        n = Node(tmp_path / f"n{len(nodes)}", **overrides)
        nodes.append(n)
        if start:
            n.start()
        return n

    yield make
    for n in nodes:
        n.close()


@pytest.fixture
def node(node_factory: Any) -> Node:
    """A started node with one worker; register clients with node.add_client()."""
    return node_factory()  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------- datasets


def make_dataset(path: Path, *, patient_id: str = "P1", patient_name: str = "DOE^JANE",
                 study_uid: str | None = None, series_uid: str | None = None,
                 sop_uid: str | None = None, modality: str = "CT", pixel_bytes: int = 2048,
                 study_date: str = "20260101", ts: str = "1.2.840.10008.1.2.1",
                 **extra: Any) -> Path:
    """Write a synthetic Part 10 image (invented patient) and return its path."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, MRImageStorage, generate_uid

    ds = Dataset()
    ds.SOPClassUID = MRImageStorage if modality == "MR" else CTImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = "19800101"
    ds.PatientSex = "F"
    ds.StudyDate = study_date
    ds.StudyTime = "101010"
    ds.AccessionNumber = "A" + patient_id
    ds.StudyID = "1"
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    side = max(1, int((pixel_bytes // 2) ** 0.5))
    ds.Rows = side
    ds.Columns = pixel_bytes // 2 // side
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    for k, v in extra.items():
        setattr(ds, k, v)
    ds.PixelData = os.urandom(ds.Rows * ds.Columns * 2)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ts
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def stored_files(node: Node) -> list[Path]:
    return sorted(p for p in node.objects.rglob("*.dcm") if ".tmp" not in p.parts)
