"""Caps on what one peer can make a worker hold (issue 9, DESIGN §8).

pynetdicom accumulates a DIMSE command set, and every dataset other than a chunked
C-STORE's, in memory (`BytesIO`) until the last fragment arrives, with no bound: a peer
that never sends the last fragment of a C-FIND identifier grows the worker without limit.
Here each decoded P-DATA is checked against `[node] max_request_kb`; beyond it the
association is aborted (as for an invalid PDU) and audited. The PDU length itself is
bounded in `tuning._socket_recv`, the number of presentation contexts in admission.
"""

from __future__ import annotations

import contextlib
import logging
from io import BytesIO
from typing import Any

from pynetdicom.dimse_messages import DIMSEMessage

log = logging.getLogger("pacsd.limits")

_original_decode_msg = DIMSEMessage.decode_msg
_applied = False


def apply() -> None:
    """Install the check (idempotent). The limit is read from `ae.pacsd_max_request`."""
    global _applied
    if not _applied:
        DIMSEMessage.decode_msg = _decode_msg  # type: ignore[method-assign]
        _applied = True


def _held(msg: Any) -> int:
    size = msg.encoded_command_set.tell()
    if isinstance(msg.data_set, BytesIO):
        size += msg.data_set.tell()
    return int(size)


def _decode_msg(self: Any, primitive: Any, assoc: Any = None) -> bool:
    try:
        done = bool(_original_decode_msg(self, primitive, assoc))
    except Exception as exc:
        # a command set without CommandField, a dataset type that is not US, ...: raised
        # inside the state machine's action, this killed the DUL thread (a bare close, a
        # traceback, no audit; found by fuzzing). Abort as for an invalid PDU instead.
        return _abort(self, assoc, "dimse", f"malformed DIMSE message: "
                      f"{type(exc).__name__}: {str(exc)[:120]}")
    limit = getattr(getattr(assoc, "ae", None), "pacsd_max_request", None)
    if not limit or _held(self) <= limit:
        return done
    return _abort(self, assoc, "max_request", f"DIMSE message of more than {_held(self)} "
                  "bytes exceeds node.max_request_kb")


def _abort(msg: Any, assoc: Any, gate: str, reason: str) -> bool:
    """Drop what the message holds, audit, and let the state machine abort as for an
    invalid PDU (Evt19 -> AA-8: A-ABORT to the peer); later P-DATA is ignored in Sta13."""
    msg.encoded_command_set = BytesIO()
    msg.data_set = BytesIO()
    spool = getattr(msg, "_data_set_file", None)
    if spool is not None and hasattr(spool, "abort"):
        with contextlib.suppress(Exception):  # e.g. its final flush hits a full disk
            spool.abort()
    msg._data_set_file = None
    log.warning("aborting association: %s", reason)
    refused(assoc, gate, reason)
    dul = getattr(assoc, "dul", None)
    if dul is not None:
        dul.event_queue.put("Evt19")
    return False


def refused(assoc: Any, gate: str, reason: str) -> None:
    """Audit a peer cut off by a limit (assoc.rejected names the limit as the gate)."""
    from pacsd import audit

    state = getattr(assoc, "pacsd_state", None)
    ctx = state.audit_context() if state is not None else {}
    try:
        audit.record(audit.Event("assoc.rejected"), audit.Outcome.SERIOUS, gate=gate,
                     reason=reason, **ctx)
    except Exception:  # never let auditing break the receive path
        log.exception("audit of a refused peer failed")


__all__ = ["apply", "refused"]
