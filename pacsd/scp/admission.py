"""Gates 3 and 4 of DESIGN §4, run when the A-ASSOCIATE-RQ arrives (EVT_REQUESTED).

pynetdicom lets an EVT_REQUESTED handler send the A-ASSOCIATE-RJ itself; doing every
check here (rather than in EVT_USER_ID, which pynetdicom calls only when a user identity
item is present) is what makes `--require-user` enforceable.
"""

from __future__ import annotations

import logging
from typing import Any

from pacsd import audit
from pacsd.auth import aes
from pacsd.scp.state import AssocState, Services

log = logging.getLogger("pacsd.admission")

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
RJ_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised
RJ_CALLED_AE = (0x01, 0x01, 0x07)  # permanent, service user, called AE not recognised
RJ_NO_REASON = (0x01, 0x01, 0x01)  # permanent, service user, no reason given
RJ_LIMIT = (0x02, 0x03, 0x02)  # transient, presentation provider, local limit exceeded


def _reject(services: Services, assoc: Any, state: AssocState, rsd: tuple[int, int, int],
            gate: str, reason: str, **fields: Any) -> None:
    log.info("association from %s (%s) refused at gate %s: %s", state.source_ip,
             state.calling_ae, gate, reason)
    services.refuse(state.source_ip, gate=gate, reason=reason, state=state, **fields)
    assoc.acse.send_reject(*rsd)


def handle_requested(event: Any, services: Services) -> None:
    """EVT_REQUESTED: admit or reject the association (gates 3, 4 and the association cap)."""
    assoc = event.assoc
    state: AssocState = assoc.pacsd_state
    rq = assoc.requestor.primitive
    state.calling_ae = rq.calling_ae_title.strip()
    state.called_ae = rq.called_ae_title.strip()
    cfg = services.cfg

    proposed = len(rq.presentation_context_definition_list)
    if proposed > cfg.node.max_contexts:
        return _reject(services, assoc, state, RJ_NO_REASON, "max_contexts",
                       f"{proposed} presentation contexts proposed "
                       f"(node.max_contexts={cfg.node.max_contexts})")
    if state.called_ae != cfg.node.ae_title:
        return _reject(services, assoc, state, RJ_CALLED_AE, "called_ae",
                       f"called AE title {state.called_ae!r} is not ours")
    peer = aes.get(state.calling_ae)
    if peer is None:
        return _reject(services, assoc, state, RJ_CALLING_AE, "calling_ae", "not registered")
    if not peer.enabled:
        return _reject(services, assoc, state, RJ_CALLING_AE, "calling_ae", "disabled")
    if state.cert_sha256 != peer.cert_sha256:
        return _reject(services, assoc, state, RJ_CALLING_AE, "certificate",
                       "client certificate is not the one bound to this AE title",
                       cert_sha256=state.cert_sha256)
    if not peer.allows_source(state.source_ip):
        return _reject(services, assoc, state, RJ_CALLING_AE, "source_range",
                       "source address outside the AE's registered ranges")
    state.peer = peer

    if not _admit_user(services, assoc, state, peer):
        return None

    slot = services.slots.acquire()
    if slot is None:
        return _reject(services, assoc, state, RJ_LIMIT, "max_associations",
                       f"{cfg.node.max_associations} associations already open")
    state.slot = slot
    if aes.note_source(peer.title, state.source_ip):
        audit.record(audit.Event("alert.anomaly"), audit.Outcome.MINOR, reason="new_source",
                     subject="ae", **state.audit_context())
    return None


def _admit_user(services: Services, assoc: Any, state: AssocState, peer: aes.Peer) -> bool:
    """Gate 4; records auth.* audit events. False when the association was rejected."""
    from pacsd.auth import identity

    item = assoc.requestor.user_identity
    if item is None:
        if peer.require_user:
            _reject(services, assoc, state, RJ_NO_REASON, "user_identity",
                    "user identity required by this AE")
            return False
        return True
    decision = identity.verify_identity(
        services.cfg,
        user_type=int(item.user_identity_type or 0),
        primary=bytes(item.primary_field or b""),
        secondary=bytes(item.secondary_field or b""),
        source_ip=state.source_ip,
        require_user=peer.require_user,
    )
    if not decision.ok:
        ctx = state.audit_context()
        ctx["user"] = decision.username or ""
        audit.record(audit.Event("auth.failure"), audit.Outcome.SERIOUS, reason=decision.reason,
                     **ctx)
        if getattr(decision, "locked_now", False):
            audit.record(audit.Event("auth.lockout"), audit.Outcome.SERIOUS, **ctx)
        if getattr(decision, "source_blocked_now", False):
            audit.record(audit.Event("alert.anomaly"), audit.Outcome.SERIOUS,
                         reason="source_blocked", **ctx)
        _reject(services, assoc, state, RJ_NO_REASON, "user_identity", decision.reason)
        return False
    state.identity_verified = True
    state.user, state.role = decision.username, decision.role
    if state.user is None:  # type 1 (name only) on an AE that does not require a user
        return True
    audit.record(audit.Event("auth.login"), audit.Outcome.SUCCESS, **state.audit_context())
    if getattr(decision, "new_source", False):
        audit.record(audit.Event("alert.anomaly"), audit.Outcome.MINOR, reason="new_source",
                     subject="user", **state.audit_context())
    return True


def handle_user_id(event: Any, services: Services) -> tuple[bool, bytes | None]:
    """EVT_USER_ID: the identity was already verified in handle_requested."""
    state: AssocState = event.assoc.pacsd_state
    return state.identity_verified, None
