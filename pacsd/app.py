"""Composition root: builds store, auth, audit and the SCP server from a Config.

Nothing else wires objects together. pynetdicom's module-level `_config` flags are set
here, once per process.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import pydicom.config
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, dimse_messages, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacsd import tls
from pacsd.config import Config
from pacsd.errors import PacsdError
from pacsd.scp import admission, commitment, handlers, limits, qr, tuning
from pacsd.scp.server import AssociationSlots, NodeServer
from pacsd.scp.state import Services, TLSHolder

log = logging.getLogger("pacsd.app")

# Transfer syntaxes we accept as proposed; objects are stored as received, never transcoded.
_ALL_TS: list[str] = list(ALL_TRANSFER_SYNTAXES)


def slots_path(cfg: Config) -> Path:
    return Path(cfg.auth.database).parent / ".assoc-slots"


def _configure_pynetdicom(services: Services) -> None:
    # Receive each C-STORE dataset straight into a hashing spool file under the object
    # root (one file, one pass: SHA-256 is computed while the bytes are written).
    _config.STORE_RECV_CHUNKED_DATASET = True
    # C-MOVE/C-GET stream each verified object from its file, as stored (scp/qr.py).
    _config.STORE_SEND_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = lambda *a, **kw: services.store.spool()  # type: ignore[attr-defined,assignment]
    # File meta written by our packer (same bytes, ~2 µs) instead of pydicom (~0.9 ms).
    from pacsd.store import filemeta

    dimse_messages.create_file_meta = filemeta.create_meta_uids  # type: ignore[attr-defined,assignment]
    dimse_messages.write_file_meta_info = filemeta.write_meta_uids  # type: ignore[attr-defined,assignment]
    _config.LOG_HANDLER_LEVEL = "none"
    # Q/R identifiers (PHI) are not decoded and pretty-printed a second time for a log
    # line that is never written (~0.2 ms per C-FIND); the handlers decode them once.
    _config.LOG_REQUEST_IDENTIFIERS = False
    # Wait for work instead of sleep-polling; whole-PDU socket reads; hand-encoded
    # C-STORE-RSP (scp/tuning.py).
    tuning.apply()
    limits.apply()  # caps on what one peer can make a worker hold
    # pydicom's per-element regex validation costs ~5 % of a small C-STORE; the store
    # validates every UID it relies on itself (store/ingest.py) and refuses bad ones.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    # Values from peers are validated by our own rules; do not let pydicom reject or fix
    # them silently while decoding command sets.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def build_ae(cfg: Config) -> Any:
    ae = AE(ae_title=cfg.node.ae_title)
    ae.maximum_pdu_size = cfg.node.max_pdu_size
    ae.pacsd_max_request = cfg.node.max_request_kb * 1024  # type: ignore[attr-defined]  # read by scp/limits.py
    ae.network_timeout = cfg.node.network_timeout
    ae.acse_timeout = cfg.node.acse_timeout
    ae.dimse_timeout = cfg.node.dimse_timeout
    ae.connection_timeout = cfg.node.acse_timeout
    # The association cap is enforced across workers by AssociationSlots.
    ae.maximum_associations = 10_000
    ae.require_called_aet = False  # checked in admission, with an audit record
    ae.require_calling_aet = []
    ae.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(str(cx.abstract_syntax), _ALL_TS)
    _add_services(ae)
    return ae


def _add_services(ae: Any) -> None:
    """Query/Retrieve and Storage Commitment contexts (with their role selections)."""
    commitment.add_contexts(ae)
    qr.add_contexts(ae)


def _service_handlers(services: Services) -> list[Any]:
    handlers = list(commitment.event_handlers(services))  # starts its dispatcher thread
    return handlers + list(qr.event_handlers(services))


def event_handlers(services: Services) -> list[Any]:
    s = [services]
    return [
        (evt.EVT_REQUESTED, admission.handle_requested, s),
        (evt.EVT_USER_ID, admission.handle_user_id, s),
        (evt.EVT_ACCEPTED, handlers.handle_accepted, s),
        (evt.EVT_RELEASED, handlers.handle_released, s),
        (evt.EVT_ABORTED, handlers.handle_aborted, s),
        (evt.EVT_C_ECHO, handlers.handle_echo, s),
        (evt.EVT_C_STORE, handlers.handle_store, s),
        *_service_handlers(services),
    ]


def build_services(cfg: Config) -> Services:
    """Open the databases and the store, load TLS; raises PacsdError on any problem."""
    from pacsd.auth.database import open_auth_db
    from pacsd.keys import require
    from pacsd.store.ingest import Store

    require(cfg)  # a wrong or missing storage key: one line, exit 2, nothing written
    open_auth_db(cfg)
    store = Store.open(cfg)
    holder = TLSHolder(tls.server_context(cfg))
    slots = AssociationSlots(slots_path(cfg), cfg.node.max_associations)
    return Services(cfg, store, holder, slots, client_tls=tls.client_context(cfg))


def build_server(cfg: Config, listen_sock: socket.socket) -> tuple[NodeServer, Services]:
    """The worker's server on the inherited listening socket."""
    services = build_services(cfg)
    _configure_pynetdicom(services)
    ae = build_ae(cfg)
    server = NodeServer(ae, listen_sock, services, event_handlers(services))
    ae._servers.append(server)
    return server, services


def check(cfg: Config) -> list[str]:
    """Everything `check-config` reports: certificates, keys, databases, store root.

    Raises KeyProblem (exit 2) when encryption is on and the storage key is unusable."""
    from pacsd.keys import require

    require(cfg)
    problems = tls.check_files(cfg)
    try:
        from pacsd.auth.database import open_auth_db

        open_auth_db(cfg).close()
    except PacsdError as exc:
        problems.append(f"auth.database: {exc}")
    try:
        from pacsd.store.ingest import Store

        Store.open(cfg).close()
    except PacsdError as exc:
        problems.append(f"storage: {exc}")
    if cfg.storage.encryption or cfg.storage.key_file:
        key = Path(cfg.storage.key_file)
        if key.exists():
            mode = key.stat().st_mode & 0o777
            if mode & 0o077:
                problems.append(f"storage.key_file: {key} is readable by others "
                                f"(mode {mode:o}); chmod 600 it")
            if key.stat().st_size != 32:
                problems.append(f"storage.key_file: {key} is not a 32-byte key")
        elif cfg.storage.encryption:
            problems.append(f"storage.key_file: {key} not found (needed for encryption)")
    if cfg.audit.syslog_ca and not Path(cfg.audit.syslog_ca).exists():
        problems.append(f"audit.syslog_ca: {cfg.audit.syslog_ca} not found")
    return problems
