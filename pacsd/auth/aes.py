"""The registry of peer AE titles, each bound to its client certificate's SHA-256.

Admission (DESIGN §4 gate 3) reads it fresh for every association, so `pacsd ae ...`
takes effect at once while the node runs.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from dataclasses import dataclass
from datetime import UTC, datetime

import peewee

from pacsd.auth.database import AuthModel
from pacsd.errors import AlreadyExists, NotFound, UsageError

SERVICES = ("echo", "store", "commit", "find", "move", "get")
DEFAULT_PERMITS = ("echo", "store")


class PeerAE(AuthModel):
    title = peewee.TextField(unique=True)
    cert_sha256 = peewee.TextField()
    cert_subject = peewee.TextField(default="")
    cert_not_after = peewee.TextField(default="")
    hosts = peewee.TextField(default="[]")
    permits = peewee.TextField(default="[]")
    require_user = peewee.BooleanField(default=False)
    dest = peewee.TextField(default="")
    move_to = peewee.TextField(default="[]")
    enabled = peewee.BooleanField(default=True)
    created = peewee.TextField()
    updated = peewee.TextField()

    class Meta:
        table_name = "peer_ae"


class PeerSource(AuthModel):
    title = peewee.TextField()
    address = peewee.TextField()
    first_seen = peewee.TextField()
    last_seen = peewee.TextField()

    class Meta:
        table_name = "peer_source"


@dataclass(frozen=True)
class Peer:
    """An immutable snapshot of a registered peer, as admission and handlers see it."""

    title: str
    cert_sha256: str
    cert_subject: str
    cert_not_after: str
    hosts: tuple[str, ...]
    permits: frozenset[str]
    require_user: bool
    dest: str
    move_to: tuple[str, ...]
    enabled: bool

    def allows_source(self, address: str) -> bool:
        """True when no ranges are set or `address` lies inside one of them."""
        if not self.hosts:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in ipaddress.ip_network(net) for net in self.hosts)

    def as_dict(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d["permits"] = sorted(self.permits)
        d["hosts"] = list(self.hosts)
        d["move_to"] = list(self.move_to)
        return d


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _snapshot(row: PeerAE) -> Peer:
    return Peer(
        title=row.title,
        cert_sha256=row.cert_sha256,
        cert_subject=row.cert_subject,
        cert_not_after=row.cert_not_after,
        hosts=tuple(json.loads(row.hosts)),
        permits=frozenset(json.loads(row.permits)),
        require_user=bool(row.require_user),
        dest=row.dest,
        move_to=tuple(json.loads(row.move_to)),
        enabled=bool(row.enabled),
    )


def validate_title(title: str) -> str:
    """Return the AE title stripped; raises UsageError when it is not a valid AE title."""
    t = title.strip()
    if not 1 <= len(t) <= 16 or "\\" in t or not all(0x20 <= ord(c) < 0x7F for c in t):
        raise UsageError(f"{title!r} is not a valid AE title (1-16 printable ASCII characters)")
    return t


def normalize_permits(permits: list[str] | None) -> list[str]:
    """Validate a permit list; raises UsageError naming an unknown service."""
    items = list(DEFAULT_PERMITS) if permits is None else permits
    for p in items:
        if p not in SERVICES:
            raise UsageError(f"--permit: unknown service {p!r} (known: {', '.join(SERVICES)})")
    return sorted(set(items), key=SERVICES.index)


def normalize_hosts(hosts: list[str]) -> list[str]:
    out = []
    for h in hosts:
        try:
            out.append(str(ipaddress.ip_network(h, strict=False)))
        except ValueError:
            raise UsageError(f"--host: {h!r} is not an IP address or network") from None
    return out


def add(
    title: str,
    *,
    cert_sha256: str,
    cert_subject: str = "",
    cert_not_after: str = "",
    hosts: list[str] | None = None,
    permits: list[str] | None = None,
    require_user: bool = False,
    dest: str = "",
    move_to: list[str] | None = None,
) -> Peer:
    """Register a peer; raises AlreadyExists or UsageError."""
    t = validate_title(title)
    now = _now()
    try:
        row = PeerAE.create(
            title=t,
            cert_sha256=cert_sha256.lower(),
            cert_subject=cert_subject,
            cert_not_after=cert_not_after,
            hosts=json.dumps(normalize_hosts(hosts or [])),
            permits=json.dumps(normalize_permits(permits)),
            require_user=require_user,
            dest=dest,
            move_to=json.dumps([validate_title(m) for m in (move_to or [])]),
            enabled=True,
            created=now,
            updated=now,
        )
    except peewee.IntegrityError:
        raise AlreadyExists(f"AE title {t!r} is already registered") from None
    return _snapshot(row)


def get(title: str) -> Peer | None:
    """The registered peer with this title, or None."""
    row = PeerAE.get_or_none(PeerAE.title == title.strip())
    return _snapshot(row) if row else None


def require(title: str) -> Peer:
    peer = get(title)
    if peer is None:
        raise NotFound(f"AE title {title!r} is not registered")
    return peer


def all_peers() -> list[Peer]:
    return [_snapshot(r) for r in PeerAE.select().order_by(PeerAE.title)]


def remove(title: str) -> None:
    if PeerAE.delete().where(PeerAE.title == title.strip()).execute() == 0:
        raise NotFound(f"AE title {title!r} is not registered")


def set_enabled(title: str, enabled: bool) -> None:
    n = (
        PeerAE.update(enabled=enabled, updated=_now())
        .where(PeerAE.title == title.strip())
        .execute()
    )
    if n == 0:
        raise NotFound(f"AE title {title!r} is not registered")


def note_source(title: str, address: str) -> bool:
    """Remember that `title` connected from `address`; True when the address is new for it."""
    now = _now()
    db = PeerSource._meta.database
    cur = db.execute_sql(
        "INSERT OR IGNORE INTO peer_source (title, address, first_seen, last_seen) "
        "VALUES (?, ?, ?, ?)",
        (title, address, now, now),
    )
    if cur.rowcount == 1:
        return True
    db.execute_sql("UPDATE peer_source SET last_seen = ? WHERE title = ? AND address = ?",
                   (now, title, address))
    return False
