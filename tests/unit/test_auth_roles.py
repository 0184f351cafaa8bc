"""Gate 5 role permissions (pacsd.auth.roles)."""

from __future__ import annotations

import pytest

from pacsd.auth.aes import SERVICES
from pacsd.auth.roles import ROLE_SERVICES, permitted

ALL = frozenset(SERVICES)


def test_role_table() -> None:
    assert ROLE_SERVICES["modality"] == {"echo", "store", "commit"}
    assert ROLE_SERVICES["workstation"] == {"echo", "find", "move", "get"}
    assert ROLE_SERVICES["admin"] == ALL


@pytest.mark.parametrize("service", ["find", "move", "get"])
def test_modality_cannot_query_or_retrieve(service: str) -> None:
    assert not permitted(ALL, "modality", service)


@pytest.mark.parametrize("service", ["store", "commit"])
def test_workstation_cannot_store(service: str) -> None:
    assert not permitted(ALL, "workstation", service)


def test_role_cannot_widen_the_ae_permissions() -> None:
    assert not permitted(frozenset({"echo"}), "admin", "store")
    assert permitted(frozenset({"echo", "store"}), "modality", "store")


def test_no_user_means_the_ae_permissions_alone() -> None:
    assert permitted(frozenset({"find"}), None, "find")
    assert not permitted(frozenset({"find"}), None, "store")


def test_unknown_role_permits_nothing() -> None:
    assert not any(permitted(ALL, "root", s) for s in SERVICES)
