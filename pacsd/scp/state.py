"""What a worker's handlers share (Services) and what one association carries (AssocState).

`app.py` builds one Services per worker process and hands it to the server and handlers;
nothing here is module-global. Handlers stay thin: they call `services.store`,
`services.permitted`, `services.audit_*` and map results to named DIMSE statuses.
"""

from __future__ import annotations

import secrets
import ssl
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pacsd import audit
from pacsd.auth import aes
from pacsd.config import Config

if TYPE_CHECKING:
    from pacsd.scp.server import AssociationSlots
    from pacsd.store.ingest import Store


@dataclass
class AssocState:
    """One association (one TLS connection): identity, peer, user and store tallies."""

    assoc_id: str
    source_ip: str
    source_port: int
    cert_sha256: str
    calling_ae: str = ""
    called_ae: str = ""
    peer: aes.Peer | None = None
    user: str | None = None
    role: str | None = None
    slot: int | None = None
    accepted: bool = False
    identity_verified: bool = False  # gate 4 passed for a User Identity item
    # (study_uid, succeeded) -> [instances, bytes]
    tally: dict[tuple[str, bool], list[int]] = field(default_factory=lambda: defaultdict(
        lambda: [0, 0]))
    failures: dict[str, str] = field(default_factory=dict)  # study_uid -> last failure reason

    def audit_context(self) -> dict[str, Any]:
        return {
            "assoc_id": self.assoc_id,
            "source_ip": self.source_ip,
            "calling_ae": self.calling_ae,
            "called_ae": self.called_ae,
            "user": self.user or "",
        }


class TLSHolder:
    """The current server SSLContext; swapped whole on reload, read per connection."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self._ctx = ctx
        self._lock = threading.Lock()

    def get(self) -> ssl.SSLContext:
        with self._lock:
            return self._ctx

    def set(self, ctx: ssl.SSLContext) -> None:
        with self._lock:
            self._ctx = ctx


class Services:
    """The per-worker bundle of configured parts the SCP handlers call."""

    def __init__(self, cfg: Config, store: Store, tls: TLSHolder, slots: AssociationSlots,
                 client_tls: ssl.SSLContext | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self._tls = tls
        self.slots = slots
        self.client_tls = client_tls  # for C-MOVE sub-associations and commitment reports

    # ---- connections
    def tls_context(self) -> ssl.SSLContext:
        return self._tls.get()

    def new_connection(self, ip: str, port: int, sock: ssl.SSLSocket) -> AssocState:
        from pacsd.tls import peer_fingerprint

        return AssocState(
            assoc_id=secrets.token_hex(16),
            source_ip=ip,
            source_port=port,
            cert_sha256=peer_fingerprint(sock) or "",
        )

    def connection_closed(self, state: AssocState) -> None:
        self.flush_store_tally(state)
        if state.slot is not None:
            self.slots.release(state.slot)
            state.slot = None

    # ---- gates
    def source_blocked(self, ip: str) -> bool:
        from pacsd.auth import identity

        return identity.source_blocked(self.cfg, ip)

    def refuse(self, ip: str, *, gate: str, reason: str, state: AssocState | None = None,
               **fields: Any) -> None:
        """Audit a refused connection or association (assoc.rejected names the gate)."""
        ctx = state.audit_context() if state else {"source_ip": ip}
        audit.record(audit.Event("assoc.rejected"), audit.Outcome.SERIOUS, gate=gate,
                     reason=reason, **{**ctx, **fields})

    def permitted(self, state: AssocState, service: str) -> bool:
        """Gate 5: the AE's permits and, when a user is present, the user's role."""
        from pacsd.auth import roles

        if state.peer is None:
            return False
        return roles.permitted(state.peer.permits, state.role, service)

    def refuse_request(self, state: AssocState, service: str) -> None:
        audit.record(audit.Event("assoc.rejected"), audit.Outcome.MINOR, gate="permission",
                     reason=f"{service} not permitted", service=service, **state.audit_context())

    # ---- store tallies: one dicom.store record per association and study and outcome
    def tally_store(self, state: AssocState, study_uid: str, ok: bool, size: int,
                    reason: str = "") -> None:
        t = state.tally[(study_uid, ok)]
        t[0] += 1
        t[1] += size
        if not ok and reason:
            state.failures[study_uid] = reason

    def flush_store_tally(self, state: AssocState) -> None:
        for (study, ok), (count, nbytes) in sorted(state.tally.items()):
            fields: dict[str, Any] = {"study_uid": study, "instances": count, "bytes": nbytes}
            if not ok:
                fields["reason"] = state.failures.get(study, "")
            audit.record(audit.Event("dicom.store"),
                         audit.Outcome.SUCCESS if ok else audit.Outcome.SERIOUS,
                         **fields, **state.audit_context())
        state.tally.clear()
        state.failures.clear()
