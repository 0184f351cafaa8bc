"""Least privilege on the DICOM channel (DESIGN §4 gate 5): which role may use which service."""

from __future__ import annotations

from pacsd.auth.aes import SERVICES

ROLES = ("modality", "workstation", "admin")

ROLE_SERVICES: dict[str, frozenset[str]] = {
    "modality": frozenset({"echo", "store", "commit"}),
    "workstation": frozenset({"echo", "find", "move", "get"}),
    "admin": frozenset(SERVICES),
}


def permitted(peer_permits: frozenset[str], role: str | None, service: str) -> bool:
    """True when the AE may use `service` and, if a user is present, so may the user's role.

    `role` is None for an association without a verified user: then only the AE's
    permissions apply. An unknown role permits nothing.
    """
    if service not in peer_permits:
        return False
    if role is None:
        return True
    return service in ROLE_SERVICES.get(role, frozenset())
