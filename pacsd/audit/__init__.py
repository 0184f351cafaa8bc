"""The audit trail (DESIGN §7): one typed API over a closed event vocabulary.

    from pacsd import audit
    with audit.association(assoc_id=aid, source_ip=ip, calling_ae=ae, called_ae=us):
        audit.record(audit.Event.DICOM_STORE, study_uid=uid, instances=3, bytes=1234)

Records are numbered and hash-chained by the node's one sequencer (the supervisor),
sent as RFC 5424 syslog (json or DICOM ATNA XML), spooled while syslog is down, and
checked by `pacsd audit verify FILE`. See docs/audit.md.
"""

from pacsd.audit.api import (
    CaptureSink,
    NullSink,
    association,
    bind,
    capture,
    connect_worker,
    context,
    current,
    record,
    shutdown,
    start_sequencer,
    start_standalone,
)
from pacsd.audit.chain import verify_file
from pacsd.audit.diag import configure_logging
from pacsd.audit.events import DICOM_EVENTS, Event, Outcome, secret_like
from pacsd.audit.sequencer import Sequencer, WorkerClient, socket_live, socket_path_for

__all__ = [
    "DICOM_EVENTS",
    "CaptureSink",
    "Event",
    "NullSink",
    "Outcome",
    "Sequencer",
    "WorkerClient",
    "association",
    "bind",
    "capture",
    "configure_logging",
    "connect_worker",
    "context",
    "current",
    "record",
    "secret_like",
    "shutdown",
    "socket_live",
    "socket_path_for",
    "start_sequencer",
    "start_standalone",
    "verify_file",
]
