"""Shared helpers for pacsd benchmarks: PKI, child processes, ports, data sets, timing, medians.

Benchmarks are instruments, not tests: they start every receiver themselves as a child process
on a free loopback port, with mutual TLS and a PKI made for the run, and report what they saw.
Nothing here imports pacsd; pacsd is driven through its command line as a sysadmin would.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
OUT = BENCH_DIR / "out"  # git-ignored: cached data sets and per-run scratch

# pynetdicom's pip package installs its own storescu/echoscu scripts that can shadow DCMTK's on
# PATH; benchmarks always run the Debian package's binaries.
DCMTK_DIR = "/usr/bin"


def dcmtk(tool: str) -> str:
    path = shutil.which(tool, path=DCMTK_DIR)
    if path is None:
        raise SystemExit(f"bench: DCMTK's {tool} not found in {DCMTK_DIR} (apt-get install dcmtk)")
    return path


def pacsd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pacsd", *args]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ ports


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_listening(port: int) -> bool:
    """True when a TCP socket listens on `port` (read from /proc; nothing connects to it)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def wait_until(pred: Any, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None,
               logfile: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            tail = logfile.read_text(errors="replace")[-3000:] if logfile else ""
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{tail}")
        time.sleep(0.05)
    tail = logfile.read_text(errors="replace")[-3000:] if logfile else ""
    raise RuntimeError(f"{what}: not ready after {timeout:.0f} s\n{tail}")


# ------------------------------------------------------------------------- child processes


class Child:
    """A process we started, in its own session so that its forks (storescp --fork, pacsd
    workers) are stopped with it; output goes to a log file."""

    def __init__(self, cmd: Sequence[str], logfile: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.cmd = list(cmd)
        self.logfile = logfile
        self._log = open(logfile, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, cwd=cwd, start_new_session=True)

    def log_text(self) -> str:
        return self.logfile.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after `timeout`; returns the exit status."""
        p = self.proc
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        # forked children (storescp --fork) may outlive the parent: end the group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        self._log.close()
        return p.returncode


# ------------------------------------------------------------------------------------- PKI


@dataclass(frozen=True)
class Pki:
    """One PKI for every receiver of a run, made with pacsd's own development CA.

    `template` is a pacsd node directory (`pacsd init`) with the client AE registered; each
    pacsd run copies it, so every run starts from an empty store with the same certificates.
    storescp and Orthanc present the same server certificate, and the sender the same client
    certificate, to every receiver.
    """

    template: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_ae: str


def _run(cmd: Sequence[str], what: str) -> str:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def make_pki(directory: Path, client_ae: str = "BENCH", ae_title: str = "PACSD") -> Pki:
    """`pacsd init` + `cert issue` + `ae add --permit echo,store` into `directory` (fresh)."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    node = directory / "node"
    clients = directory / "clients"
    _run(pacsd_cmd("init", str(node), "--ae-title", ae_title, "--port", str(free_port())),
         "pacsd init")
    cfg = str(node / "pacsd.toml")
    _run(pacsd_cmd("--config", cfg, "cert", "issue", client_ae, "--out", str(clients)),
         "pacsd cert issue")
    cert = clients / f"{client_ae}.pem"
    _run(pacsd_cmd("--config", cfg, "ae", "add", client_ae, "--cert", str(cert),
                   "--permit", "echo,store"), "pacsd ae add")
    tls = node / "tls"
    return Pki(node, tls / "ca.pem", tls / "server.pem", tls / "server.key", cert,
               clients / f"{client_ae}.key", client_ae)


def set_toml(path: Path, section: str, key: str, value: Any) -> None:
    """Set `key` in [section] of a TOML file, adding the line when absent (comments kept)."""
    text = path.read_text()
    rendered = str(value).lower() if isinstance(value, bool) else json.dumps(value)
    sec = re.search(rf"(?m)^\[{re.escape(section)}\][^\n]*\n", text)
    if sec is None:
        raise RuntimeError(f"no [{section}] in {path}")
    start = sec.end()
    nxt = re.search(r"(?m)^\[", text[start:])
    end = start + nxt.start() if nxt else len(text)
    body = text[start:end]
    pat = re.compile(rf"(?m)^{re.escape(key)}\s*=.*$")
    line = f"{key} = {rendered}"
    body = pat.sub(lambda _m: line, body, count=1) if pat.search(body) else f"{line}\n{body}"
    path.write_text(text[:start] + body + text[end:])


# ------------------------------------------------------------------------------ audit sink


class DatagramSink:
    """A unix datagram socket standing in for /dev/log: drains and keeps every message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[bytes] = []
        self._stop = False
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stop:
            try:
                self.messages.append(self.sock.recv(65536))
            except (TimeoutError, OSError):
                continue

    def lines(self) -> list[str]:
        return [m.decode("utf-8", "replace") for m in list(self.messages)]

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def audit_bodies(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The JSON bodies of RFC 5424 audit lines (lines without one are skipped)."""
    out = []
    for line in lines:
        i = line.find("{")
        if i >= 0:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line[i:]))
    return out


def stored_by_audit(lines: Iterable[str]) -> int:
    """Instances that successful dicom.store audit records account for."""
    return sum(int(b.get("instances", 0)) for b in audit_bodies(lines)
               if b.get("event") == "dicom.store" and b.get("outcome") == 0)


# ------------------------------------------------------------------------------- data sets

SIZE_RE = re.compile(r"^(\d+)([kKmM]?)$")


def parse_size(text: str) -> int:
    m = SIZE_RE.match(text.strip())
    if m is None:
        raise ValueError(f"bad size {text!r} (use e.g. 512k, 8k, 2m)")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1 << 20}[m.group(2).lower()]


@dataclass(frozen=True)
class DataSet:
    label: str
    files: list[Path]
    total_bytes: int

    @property
    def count(self) -> int:
        return len(self.files)

    @property
    def mean_bytes(self) -> float:
        return self.total_bytes / max(1, self.count)


_GEN_VERSION = 1


def dataset(label: str, size: int, count: int, per_study: int = 100) -> DataSet:
    """`count` synthetic CT instances of about `size` bytes each (Part 10, explicit VR LE,
    random pixels, invented patients, `per_study` instances per study and series), cached
    under bench/out/data and regenerated only when the parameters change."""
    d = OUT / "data" / f"{label}-{count}"
    manifest = d / "manifest.json"
    want = {"version": _GEN_VERSION, "size": size, "count": count, "per_study": per_study}
    if manifest.exists():
        m = json.loads(manifest.read_text())
        if m.get("params") == want:
            cached = [d / name for name in m["files"]]
            if all(f.exists() for f in cached):
                return DataSet(label, cached, int(m["total_bytes"]))
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    log(f"generating {count} instances of ~{size} bytes in {d}")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    cols = 512 if size >= 256 * 1024 else 64
    rows = max(1, (size - 1024) // (2 * cols))
    files: list[Path] = []
    total = 0
    study = series = ""
    for i in range(count):
        if i % per_study == 0:
            study, series = generate_uid(), generate_uid()
        n = i // per_study
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.PatientID = f"BENCH{n:05d}"
        ds.PatientName = f"BENCH^PATIENT{n:05d}"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyDate = "20260101"
        ds.StudyTime = "120000"
        ds.AccessionNumber = f"ACC{n:05d}"
        ds.StudyID = str(n)
        ds.StudyDescription = "bench ingest"
        ds.Modality = "CT"
        ds.SeriesNumber = 1
        ds.SeriesDescription = "synthetic"
        ds.InstanceNumber = i % per_study + 1
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 0
        ds.PixelData = os.urandom(rows * cols * 2)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = d / f"{i:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        total += path.stat().st_size
    manifest.write_text(json.dumps({"params": want, "files": [f.name for f in files],
                                    "total_bytes": total}))
    return DataSet(label, files, total)


def split(items: Sequence[Path], k: int) -> list[list[Path]]:
    """`items` in `k` contiguous parts of near-equal length (each sender sends whole studies
    where the part boundaries allow)."""
    n = len(items)
    bounds = [n * i // k for i in range(k + 1)]
    return [list(items[bounds[i]:bounds[i + 1]]) for i in range(k)]


# ---------------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class SendResult:
    seconds: float
    returncodes: list[int]
    failures: list[str]  # stderr tails of senders that reported errors


def send_concurrently(cmds: list[list[str]], env: dict[str, str], logdir: Path,
                      timeout: float = 3600) -> SendResult:
    """Start every command at once; the time runs from the first start to the last exit."""
    logdir.mkdir(parents=True, exist_ok=True)
    logs = [open(logdir / f"sender{i}.log", "wb") for i in range(len(cmds))]  # noqa: SIM115
    try:
        t0 = time.perf_counter()
        procs = [subprocess.Popen(c, stdout=f, stderr=subprocess.STDOUT, env=env)
                 for c, f in zip(cmds, logs, strict=True)]
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise
        elapsed = time.perf_counter() - t0
    finally:
        for f in logs:
            f.close()
    failures = []
    for i, p in enumerate(procs):
        text = (logdir / f"sender{i}.log").read_text(errors="replace")
        if p.returncode != 0 or re.search(r"(?m)^E: ", text):
            failures.append(f"sender {i} exit {p.returncode}: {text.strip()[-800:]}")
    return SendResult(elapsed, [p.returncode for p in procs], failures)


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields), idle


def busy_fraction(interval: float = 0.5) -> float:
    """Share of all CPUs busy over `interval` seconds (0..1), from /proc/stat."""
    t0, i0 = _cpu_times()
    time.sleep(interval)
    t1, i1 = _cpu_times()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_idle(limit: float, timeout: float) -> float:
    """Write back what earlier runs left dirty in the page cache (storescp does not fsync:
    ~0.5 GB per run, which the kernel would otherwise flush during the next runs, slowing
    every fsync and taking CPU), then wait (up to `timeout` s) until the machine is less
    than `limit` busy; returns the last busy fraction seen, which the caller records."""
    os.sync()
    deadline = time.monotonic() + timeout
    busy = busy_fraction()
    while busy >= limit and time.monotonic() < deadline:
        busy = busy_fraction(1.0)
    return busy


def block_device_stat(path: Path) -> Path | None:
    """The /sys stat file of the block device holding `path`'s file system (a partition's
    own, which counts the same fields); None when there is none (tmpfs, overlay...)."""
    st = path.stat()
    stat = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat")
    return stat if stat.exists() else None


def device_io(stat: Path | None) -> tuple[int, int] | None:
    """(write requests, flush requests) the device completed so far; None when the kernel
    does not count flushes there (fields 16-17 of Documentation/block/stat.rst). The kernel
    counts one (empty) write per flush too — 1,000 fsyncs of a clean file here add 1,000 to
    both — so those are left out of the writes returned."""
    if stat is None:
        return None
    try:
        fields = [int(x) for x in stat.read_text().split()]
    except (OSError, ValueError):
        return None
    return (fields[4] - fields[15], fields[15]) if len(fields) >= 17 else None


_FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS, _FS_TOPDIR_FL = 0x80086601, 0x40086602, 0x00020000


def spread_subdirs(directory: Path) -> bool:
    """Mark `directory` a top of hierarchy (`chattr +T`), so ext4 places each run directory
    made under it in a block group of its own, as it would a top-level directory. Without
    it every run lands in the block group of the run deleted just before, and on a file
    system without a journal (this machine class's root) ext4 then scans past every inode
    freed in the last 60-360 s on each file it creates (`recently_deleted`): 0.3-0.9 ms of
    CPU per new file here, whichever receiver is running; a store that has not just
    deleted thousands of files does not pay it. False where the flag is not supported."""
    import array
    import fcntl

    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        flags = array.array("i", [0])
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags, True)
        flags[0] |= _FS_TOPDIR_FL
        fcntl.ioctl(fd, _FS_IOC_SETFLAGS, flags, True)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def count_files(root: Path, suffix: str = "") -> int:
    n = 0
    for _dirpath, _dirs, names in os.walk(root):
        n += sum(1 for name in names if name.endswith(suffix))
    return n
