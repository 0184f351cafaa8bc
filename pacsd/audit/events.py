"""The closed audit vocabulary: event names, outcomes, their DICOM codes, and field rules.

Every event maps to a DICOM PS3.15 A.5 audit event (EventID, EventTypeCode and
EventActionCode), used for the `atna` format and listed in docs/audit.md.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any


class Event(StrEnum):
    """What happened; the value is the MSGID and the `event` field of the record."""

    APP_START = "app.start"
    APP_STOP = "app.stop"
    ASSOC_ACCEPTED = "assoc.accepted"
    ASSOC_REJECTED = "assoc.rejected"
    ASSOC_RELEASED = "assoc.released"
    ASSOC_ABORTED = "assoc.aborted"
    AUTH_LOGIN = "auth.login"
    AUTH_FAILURE = "auth.failure"
    AUTH_LOCKOUT = "auth.lockout"
    DICOM_STORE = "dicom.store"
    DICOM_QUERY = "dicom.query"
    DICOM_RETRIEVE = "dicom.retrieve"
    DICOM_COMMIT = "dicom.commit"
    INTEGRITY_FAILURE = "integrity.failure"
    ADMIN_USER = "admin.user"
    ADMIN_AE = "admin.ae"
    CONFIG_RELOAD = "config.reload"
    ALERT_ANOMALY = "alert.anomaly"
    AUDIT_DROPPED = "audit.dropped"
    STORE_BACKUP = "store.backup"
    STORE_RESTORE = "store.restore"
    KEY_CREATE = "key.create"  # encryption at rest (issue 7): keyring made
    KEY_ROTATE = "key.rotate"  # a new key version for new objects
    KEY_REWRAP = "key.rewrap"  # rewrap/encrypt-existing progress and completion


class Outcome(IntEnum):
    """EventOutcomeIndicator of PS3.15 A.5 (RFC 3881)."""

    SUCCESS = 0
    MINOR = 4  # minor failure: the action did not complete, nothing is harmed
    SERIOUS = 8  # serious failure: a refusal, a lost record, a failed check
    MAJOR = 12  # major failure: the node is marginal or unstable


@dataclass(frozen=True)
class Code:
    """A DICOM coded value: (csd-code, codeSystemName, originalText)."""

    code: str
    meaning: str
    scheme: str = "DCM"


@dataclass(frozen=True)
class DicomEvent:
    event_id: Code
    type_code: Code | None
    action: str  # EventActionCode: C R U D E


APPLICATION_ACTIVITY = Code("110100", "Application Activity")
SECURITY_ALERT = Code("110113", "Security Alert")
USER_AUTHENTICATION = Code("110114", "User Authentication")
INSTANCES_TRANSFERRED = Code("110104", "DICOM Instances Transferred")
QUERY = Code("110112", "Query")
BEGIN_TRANSFERRING = Code("110102", "Begin Transferring DICOM Instances")
EXPORT = Code("110106", "Export")
IMPORT = Code("110107", "Import")
INSTANCES_ACCESSED = Code("110103", "DICOM Instances Accessed")

APPLICATION_START = Code("110120", "Application Start")
APPLICATION_STOP = Code("110121", "Application Stop")
LOGIN = Code("110122", "Login")
LOGOUT = Code("110123", "Logout")
NODE_AUTHENTICATION = Code("110126", "Node Authentication")
SECURITY_CONFIGURATION = Code("110129", "Security Configuration")
AUDIT_RECORDING_STOPPED = Code("110133", "Audit Recording Stopped")
OBJECT_SECURITY_ATTRIBUTES_CHANGED = Code("110135", "Object Security Attributes Changed")
USER_SECURITY_ATTRIBUTES_CHANGED = Code("110137", "User Security Attributes Changed")

DICOM_EVENTS: dict[Event, DicomEvent] = {
    Event.APP_START: DicomEvent(APPLICATION_ACTIVITY, APPLICATION_START, "E"),
    Event.APP_STOP: DicomEvent(APPLICATION_ACTIVITY, APPLICATION_STOP, "E"),
    # an association is mutual-TLS node authentication, then an AE session
    Event.ASSOC_ACCEPTED: DicomEvent(SECURITY_ALERT, NODE_AUTHENTICATION, "E"),
    Event.ASSOC_REJECTED: DicomEvent(SECURITY_ALERT, NODE_AUTHENTICATION, "E"),
    Event.ASSOC_RELEASED: DicomEvent(USER_AUTHENTICATION, LOGOUT, "E"),
    Event.ASSOC_ABORTED: DicomEvent(USER_AUTHENTICATION, LOGOUT, "E"),
    Event.AUTH_LOGIN: DicomEvent(USER_AUTHENTICATION, LOGIN, "E"),
    Event.AUTH_FAILURE: DicomEvent(USER_AUTHENTICATION, LOGIN, "E"),
    Event.AUTH_LOCKOUT: DicomEvent(SECURITY_ALERT, USER_SECURITY_ATTRIBUTES_CHANGED, "E"),
    Event.DICOM_STORE: DicomEvent(INSTANCES_TRANSFERRED, None, "C"),
    Event.DICOM_QUERY: DicomEvent(QUERY, None, "E"),
    Event.DICOM_RETRIEVE: DicomEvent(BEGIN_TRANSFERRING, None, "E"),
    # storage commitment: the referenced instances are read and verified (issue 8)
    Event.DICOM_COMMIT: DicomEvent(INSTANCES_ACCESSED, None, "R"),
    Event.INTEGRITY_FAILURE: DicomEvent(SECURITY_ALERT, OBJECT_SECURITY_ATTRIBUTES_CHANGED, "E"),
    Event.ADMIN_USER: DicomEvent(SECURITY_ALERT, USER_SECURITY_ATTRIBUTES_CHANGED, "U"),
    Event.ADMIN_AE: DicomEvent(SECURITY_ALERT, SECURITY_CONFIGURATION, "U"),
    Event.CONFIG_RELOAD: DicomEvent(SECURITY_ALERT, SECURITY_CONFIGURATION, "U"),
    Event.ALERT_ANOMALY: DicomEvent(SECURITY_ALERT, NODE_AUTHENTICATION, "E"),
    Event.AUDIT_DROPPED: DicomEvent(SECURITY_ALERT, AUDIT_RECORDING_STOPPED, "E"),
    Event.STORE_BACKUP: DicomEvent(EXPORT, None, "R"),
    Event.STORE_RESTORE: DicomEvent(IMPORT, None, "C"),
    Event.KEY_CREATE: DicomEvent(SECURITY_ALERT, SECURITY_CONFIGURATION, "C"),
    Event.KEY_ROTATE: DicomEvent(SECURITY_ALERT, SECURITY_CONFIGURATION, "U"),
    Event.KEY_REWRAP: DicomEvent(SECURITY_ALERT, OBJECT_SECURITY_ATTRIBUTES_CHANGED, "U"),
}

# syslog severity (RFC 5424 §6.2.1) by outcome; alerts are always severity 1 (alert)
SEVERITY = {Outcome.SUCCESS: 6, Outcome.MINOR: 4, Outcome.SERIOUS: 3, Outcome.MAJOR: 2}
ALERT_EVENTS = frozenset({Event.ALERT_ANOMALY, Event.INTEGRITY_FAILURE})

CONTEXT_FIELDS = ("assoc_id", "source_ip", "calling_ae", "called_ae", "user")
RESERVED_FIELDS = frozenset({"ts", "event", "outcome", "seq", "chain"})

# A field name is refused when one of its words (split on "_") is in _SECRET_WORDS, or
# it contains one of _SECRET_PARTS anywhere: the API refuses secrets, callers cannot leak one.
_SECRET_WORDS = frozenset({"code", "otp", "pin", "key", "token", "pw", "pwd", "pass"})
_SECRET_PARTS = (
    "password", "passwd", "passcode", "passphrase", "secret", "totp", "private", "credential",
    "apikey", "privkey", "cookie",
)
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_PEM_PRIVATE_RE = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")

MAX_LIST = 10_000


def secret_like(name: str) -> bool:
    """True when a field name looks like it could carry a secret."""
    low = name.lower()
    if any(part in low for part in _SECRET_PARTS):
        return True
    return any(word in _SECRET_WORDS for word in low.split("_"))


def check_field(name: str, value: Any) -> Any:
    """Return the value as stored in a record; raises ValueError for a refused name or value."""
    if not _NAME_RE.match(name):
        raise ValueError(f"audit field {name!r}: names are lower_snake_case, at most 64 chars")
    if name in RESERVED_FIELDS:
        raise ValueError(f"audit field {name!r} is reserved")
    if secret_like(name):
        raise ValueError(f"audit field {name!r} looks like a secret; secrets are never audited")
    if isinstance(value, (list, tuple, frozenset, set)):
        if len(value) > MAX_LIST:
            raise ValueError(f"audit field {name!r}: more than {MAX_LIST} items")
        items = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        return [_scalar(name, v) for v in items]
    return _scalar(name, value)


def _scalar(name: str, value: Any) -> Any:
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"audit field {name!r}: {value} is not a finite number")
        return value
    if isinstance(value, StrEnum):
        return str(value)
    if isinstance(value, str):
        if _PEM_PRIVATE_RE.search(value):
            raise ValueError(f"audit field {name!r} holds a private key; refused")
        return value
    raise ValueError(
        f"audit field {name!r}: {type(value).__name__} is not a JSON scalar or list of scalars"
    )
