"""Load and validate pacsd.toml into one frozen, typed Config.

Every section is a frozen dataclass; each field declares its own validator in
its metadata, so one declaration drives parsing and the error message. An
unknown key is an error: a typo must never silently weaken security.
Relative paths resolve against the directory of the config file. Nothing here
does I/O beyond reading the one file.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pacsd.errors import ConfigError

DEFAULT_PATH = Path("/etc/pacsd/pacsd.toml")

Validator = Callable[[Any, str], Any]

_AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash


def _type_error(key: str, want: str, value: Any) -> ConfigError:
    return ConfigError(f"{key}: expected {want}, got {value!r}")


def integer(lo: int | None = None, hi: int | None = None) -> Validator:
    def check(value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(key, "an integer", value)
        if lo is not None and value < lo:
            raise ConfigError(f"{key}: {value} is below the minimum {lo}")
        if hi is not None and value > hi:
            raise ConfigError(f"{key}: {value} is above the maximum {hi}")
        return value

    return check


def boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise _type_error(key, "true or false", value)
    return value


def string(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise _type_error(key, "a string", value)
    return str(value)


def choice(*options: str) -> Validator:
    def check(value: Any, key: str) -> str:
        if value not in options:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(options)}")
        return str(value)

    return check


def ae_title(value: Any, key: str) -> str:
    text = string(value, key)
    if not _AE_TITLE_RE.match(text) or not text.strip():
        raise ConfigError(f"{key}: {text!r} is not a valid AE title (1-16 printable characters)")
    return text.strip()


def host_port(value: Any, key: str) -> str:
    text = string(value, key)
    parse_host_port(text, key)
    return text


def parse_host_port(value: str, key: str = "address") -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[::1]:port"); raises ConfigError naming `key`."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]]+):(\d{1,5})", value)
    if not m:
        raise ConfigError(f"{key}: {value!r} is not HOST:PORT")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 < port < 65536:
        raise ConfigError(f"{key}: port {port} is out of range 1-65535")
    return host, port


def path(value: Any, key: str) -> str:
    text = string(value, key)
    if not text:
        raise ConfigError(f"{key}: must not be empty")
    return text


def optional_path(value: Any, key: str) -> str:
    return string(value, key)


def syslog_url(value: Any, key: str) -> str:
    text = string(value, key)
    if not re.fullmatch(r"unix://.+|(udp|tcp|tls)://[^/]+:\d{1,5}", text):
        raise ConfigError(
            f"{key}: {text!r} is not unix:///path, udp://host:port, tcp://host:port or "
            "tls://host:port"
        )
    return text


def cidr_list(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _type_error(key, "a list of addresses or networks", value)
    out = []
    for item in value:
        try:
            out.append(str(ipaddress.ip_network(string(item, key), strict=False)))
        except ValueError:
            raise ConfigError(f"{key}: {item!r} is not an IP address or network") from None
    return tuple(out)


_FACILITIES = (
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron",
    "authpriv", "ftp", "local0", "local1", "local2", "local3", "local4", "local5", "local6",
    "local7",
)


def _f(default: Any, check: Validator, *, is_path: bool = False) -> Any:
    return field(default=default, metadata={"check": check, "path": is_path})


@dataclass(frozen=True)
class NodeConfig:
    ae_title: str = _f("PACSD", ae_title)
    listen: str = _f("127.0.0.1:2762", host_port)
    max_associations: int = _f(32, integer(1, 10_000))
    workers: int = _f(0, integer(0, 256))
    network_timeout: int = _f(30, integer(1, 86_400))
    acse_timeout: int = _f(30, integer(1, 3_600))
    dimse_timeout: int = _f(60, integer(1, 86_400))
    shutdown_grace: int = _f(30, integer(0, 3_600))
    max_pdu_size: int = _f(1_048_576, integer(16_384, 16_777_216))
    max_contexts: int = _f(128, integer(1, 128))  # presentation contexts per A-ASSOCIATE-RQ
    max_request_kb: int = _f(4096, integer(64, 1_048_576))  # DIMSE message held in memory

    @property
    def host(self) -> str:
        return parse_host_port(self.listen, "node.listen")[0]

    @property
    def port(self) -> int:
        return parse_host_port(self.listen, "node.listen")[1]

    def worker_count(self) -> int:
        return self.workers or (os.cpu_count() or 1)


@dataclass(frozen=True)
class TLSConfig:
    cert: str = _f("tls/server.pem", path, is_path=True)
    key: str = _f("tls/server.key", path, is_path=True)
    client_ca: str = _f("tls/ca.pem", path, is_path=True)
    min_version: str = _f("1.2", choice("1.2", "1.3"))


@dataclass(frozen=True)
class StorageConfig:
    root: str = _f("data/objects", path, is_path=True)
    index: str = _f("data/index.sqlite", path, is_path=True)
    on_duplicate: str = _f("keep", choice("keep", "replace", "reject"))
    min_free_mb: int = _f(1024, integer(0, 10_000_000))
    max_object_mb: int = _f(0, integer(0, 10_000_000))
    encryption: bool = _f(False, boolean)
    key_file: str = _f("tls/storage.key", path, is_path=True)
    keyring: str = _f("data/keyring.json", path, is_path=True)  # wrapped data keys (issue 7)


@dataclass(frozen=True)
class PasswordConfig:
    min_length: int = _f(15, integer(8, 128))
    max_length: int = _f(128, integer(64, 4096))
    min_classes: int = _f(0, integer(0, 4))
    max_age_days: int = _f(0, integer(0, 36_500))
    history: int = _f(5, integer(0, 100))
    blocklist: str = _f("", optional_path, is_path=True)
    bcrypt_rounds: int = _f(12, integer(10, 16))


@dataclass(frozen=True)
class TOTPConfig:
    valid_window: int = _f(1, integer(0, 10))


@dataclass(frozen=True)
class AuthConfig:
    database: str = _f("data/users.sqlite", path, is_path=True)
    lockout_threshold: int = _f(5, integer(1, 100))
    lockout_window: int = _f(900, integer(1, 86_400 * 30))
    lockout_duration: int = _f(900, integer(0, 86_400 * 365))
    source_block_threshold: int = _f(20, integer(1, 100_000))
    source_block_duration: int = _f(600, integer(0, 86_400 * 365))
    stale_after_days: int = _f(90, integer(1, 36_500))
    password: PasswordConfig = field(default_factory=PasswordConfig)
    totp: TOTPConfig = field(default_factory=TOTPConfig)


@dataclass(frozen=True)
class AuditConfig:
    syslog: str = _f("unix:///dev/log", syslog_url)
    syslog_ca: str = _f("", optional_path, is_path=True)
    syslog_cert: str = _f("", optional_path, is_path=True)
    syslog_key: str = _f("", optional_path, is_path=True)
    facility: str = _f("authpriv", choice(*_FACILITIES))
    format: str = _f("json", choice("json", "atna"))
    spool: str = _f("data/audit-spool", path, is_path=True)
    queue_size: int = _f(10_000, integer(100, 10_000_000))
    alert_failures: int = _f(10, integer(1, 100_000))
    alert_window: int = _f(60, integer(1, 86_400))


@dataclass(frozen=True)
class QueryConfig:
    max_results: int = _f(1000, integer(1, 10_000_000))
    max_suboperations: int = _f(65535, integer(1, 65535))  # instances per C-MOVE/C-GET
    case_insensitive_names: bool = _f(False, boolean)
    # C-MOVE/C-GET pending responses: at most one per this many ms (0 = one per sub-op)
    pending_interval_ms: int = _f(250, integer(0, 60_000))


@dataclass(frozen=True)
class InboxConfig:
    directory: str = _f("", optional_path, is_path=True)  # "" = no inbox
    settle_seconds: int = _f(2, integer(1, 3_600))  # size+mtime unchanged this long
    scan_interval: int = _f(2, integer(1, 3_600))  # rescan even without a file event


def ae_title_list(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _type_error(key, "a list of AE titles", value)
    return tuple(ae_title(item, key) for item in value)


@dataclass(frozen=True)
class CommitmentConfig:
    """Storage Commitment Push Model SCP (issue 8)."""

    report_on: str = _f("same-or-new", choice("same-or-new", "new"))
    new_association_for: tuple[str, ...] = _f((), ae_title_list)  # AEs always given "new"
    retry_interval: int = _f(30, integer(1, 86_400))  # first retry; doubles per attempt
    retry_max_interval: int = _f(900, integer(1, 86_400))
    retry_deadline: int = _f(86_400, integer(1, 86_400 * 30))  # then audited as failed
    max_items: int = _f(10_000, integer(1, 1_000_000))  # per N-ACTION; more is refused


@dataclass(frozen=True)
class Config:
    """The whole validated configuration; `source` is the file it came from."""

    source: str = ""
    node: NodeConfig = field(default_factory=NodeConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    inbox: InboxConfig = field(default_factory=InboxConfig)
    commitment: CommitmentConfig = field(default_factory=CommitmentConfig)

    @property
    def base_dir(self) -> Path:
        return Path(self.source).parent if self.source else Path.cwd()


def default_path() -> Path:
    env = os.environ.get("PACSD_CONFIG")
    return Path(env) if env else DEFAULT_PATH


def _build(cls: type[Any], table: Any, prefix: str, base: Path, fname: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{fname}: [{prefix}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        where = f"[{prefix}] " if prefix else ""
        raise ConfigError(f"{fname}: unknown key {where}{unknown[0]!r} (typo?)")
    kwargs: dict[str, Any] = {}
    for name, value in table.items():
        f = fields[name]
        key = f"{prefix}.{name}" if prefix else name
        if "check" in f.metadata:
            checked = f.metadata["check"](value, f"{fname}: {key}")
            if f.metadata.get("path") and checked:
                checked = str((base / checked).resolve()) if not Path(checked).is_absolute() \
                    else checked
            kwargs[name] = checked
        else:  # a nested section
            sub_type: Any = f.default_factory
            kwargs[name] = _build(sub_type, value, key, base, fname)
    # paths left at their default still resolve against the config's directory
    for name, f in fields.items():
        if name in kwargs:
            continue
        if f.metadata.get("path") and f.default:
            kwargs[name] = str((base / str(f.default)).resolve())
        elif "check" not in f.metadata:
            sub: Any = f.default_factory
            kwargs[name] = _build(sub, {}, f"{prefix}.{name}".strip("."), base, fname)
    return cls(**kwargs)


def parse(text: str, source: Path) -> Config:
    """Validate TOML text as if read from `source`; raises ConfigError naming key and file."""
    fname = str(source)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{fname}: not valid TOML: {exc}") from None
    base = source.resolve().parent
    built = _build(Config, data, "", base, fname)
    cfg = dataclasses.replace(built, source=str(source.resolve()))
    _cross_check(cfg, fname)
    return cfg  # type: ignore[no-any-return]


def load(path: Path | str | None = None) -> Config:
    """Read and validate the config file; raises ConfigError (missing, unreadable, invalid)."""
    p = Path(path) if path else default_path()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found (use --config or PACSD_CONFIG)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read config: {exc}") from None
    return parse(text, p)


def _cross_check(cfg: Config, fname: str) -> None:
    pw = cfg.auth.password
    if pw.max_length < pw.min_length:
        raise ConfigError(
            f"{fname}: auth.password.max_length ({pw.max_length}) is below min_length "
            f"({pw.min_length})"
        )
    if cfg.audit.syslog.startswith("tls://") and not cfg.audit.syslog_ca:
        raise ConfigError(f"{fname}: audit.syslog_ca is required for a tls:// syslog target")
    if bool(cfg.audit.syslog_cert) != bool(cfg.audit.syslog_key):
        raise ConfigError(f"{fname}: audit.syslog_cert and audit.syslog_key go together")
